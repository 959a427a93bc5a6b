"""Test documents generated on the fly (no binary fixtures in git): PDF (reportlab), DOCX, PPTX, HTML, XLSX."""
import io

TABLE_FACT = ("Zephyr-9", "4,731 kg")          # the distinctive fact in the PDF's table (page 2)
TABLE_QUESTION = "What is the payload capacity of the Zephyr-9 cargo drone?"


def pdf(encrypt: bool = False) -> bytes:
    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.platypus import (
        PageBreak,
        Paragraph,
        SimpleDocTemplate,
        Table,
        TableStyle,
    )

    styles = getSampleStyleSheet()
    buf = io.BytesIO()
    kwargs = {"encrypt": "secret"} if encrypt else {}
    doc = SimpleDocTemplate(buf, pagesize=A4, **kwargs)
    body = styles["BodyText"]
    story = [Paragraph("Fleet Operations Manual", styles["Title"]),
             Paragraph("Introduction", styles["Heading1"]),
             Paragraph("This manual describes the drone fleet run by the northern depot. "
                       "Pilots must file a flight plan before every mission. " * 3, body),
             PageBreak(),
             Paragraph("Drone specifications", styles["Heading1"]),
             Paragraph("The table below lists each cargo drone model with its payload capacity and range.", body)]
    rows = [["Model", "Payload capacity", "Range"], ["Kestrel-2", "120 kg", "40 km"],
            [TABLE_FACT[0], TABLE_FACT[1], "310 km"], ["Osprey-5", "880 kg", "95 km"]]
    t = Table(rows)
    t.setStyle(TableStyle([("GRID", (0, 0), (-1, -1), 0.5, colors.black)]))
    story += [t, Paragraph("Maintenance", styles["Heading1"]),
              Paragraph("Batteries are replaced every three hundred flight hours.", body)]
    doc.build(story)
    return buf.getvalue()


def docx() -> bytes:
    import docx as d

    document = d.Document()
    document.add_heading("Cafeteria Handbook", level=1)
    document.add_heading("Opening hours", level=2)
    document.add_paragraph("The cafeteria on floor three opens at seven thirty and serves lunch until two.")
    table = document.add_table(rows=2, cols=2)
    table.cell(0, 0).text, table.cell(0, 1).text = "Dish", "Price"
    table.cell(1, 0).text, table.cell(1, 1).text = "Lentil soup", "3 euros"
    buf = io.BytesIO()
    document.save(buf)
    return buf.getvalue()


def pptx() -> bytes:
    from pptx import Presentation

    prs = Presentation()
    for title, text in (("Quarterly review", "Revenue grew in every region."),
                        ("Hiring plan", "The platform team hires four engineers in spring.")):
        slide = prs.slides.add_slide(prs.slide_layouts[1])
        slide.shapes.title.text = title
        slide.placeholders[1].text = text
    buf = io.BytesIO()
    prs.save(buf)
    return buf.getvalue()


def html() -> bytes:
    return (b"<html><head><title>Bike policy</title></head><body><h1>Bike policy</h1><h2>Parking</h2>"
            b"<p>Bicycles are parked in the basement garage, which opens with the badge.</p>"
            b"<table><tr><th>Rack</th><th>Spaces</th></tr><tr><td>North</td><td>24</td></tr></table>"
            b"</body></html>")


def xlsx() -> bytes:
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = "Budget"
    ws.append(["Item", "Cost"])
    ws.append(["Laptops", 12000])
    buf = io.BytesIO()
    wb.save(buf)
    return buf.getvalue()
