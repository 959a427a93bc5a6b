"""A stand-in for ``triton_python_backend_utils`` (it exists only inside a Triton stub): model files only need its
names at import. Shared by the scripts in this folder, which run in a fresh interpreter with the project root on
sys.path."""
import sys
import types


class _PbModule(types.ModuleType):
    TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


def install() -> None:
    sys.modules["triton_python_backend_utils"] = _PbModule("triton_python_backend_utils")
