"""Build hook: the wheel also ships `simba_compress-lm_eval.pth`, so lm-eval's own command line knows
`lm_eval run --model simba`.

lm-eval 0.4 finds model classes only in its own registry and reads no plugins. A .pth line runs when Python
starts (pytest-cov ships one the same way); this one imports nothing: it adds an import hook that, when
`lm_eval.models` is first imported, registers "simba" as a lazy placeholder for
`simba_compress.harness:SimbaLM`. Everything else is in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "simba_compress-lm_eval.pth"
HOOK = '''
def _simba_compress_lm_eval_hook():
    import importlib.util

    class Finder:
        def find_spec(self, name, path=None, target=None):
            if name != "lm_eval.models":
                return None
            sys.meta_path.remove(self)  # once, and the lookup below must not come back here
            spec = importlib.util.find_spec(name)
            loader = getattr(spec, "loader", None)
            if loader is not None and hasattr(loader, "exec_module"):
                run = loader.exec_module

                def exec_module(module):
                    run(module)
                    from lm_eval.api.registry import model_registry

                    if "simba" not in model_registry:
                        model_registry.register("simba", target="simba_compress.harness:SimbaLM")

                loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Finder())


try:
    _simba_compress_lm_eval_hook()
except Exception:
    pass
'''


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        # a .pth runs only lines that start with "import": the hook goes in as one exec'd line
        (Path(self.build_lib) / PTH).write_text(f"import sys; exec({HOOK!r})\n")

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


setup(cmdclass={"build_py": BuildPy})
