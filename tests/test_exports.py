"""Pin what each package exports, so a change to the public surface is a deliberate one."""

import ast
import re
from pathlib import Path

import orchestrator
import ranks

ROOT = Path(__file__).resolve().parent.parent


def test_ranks_exports():
    assert {
        "Context", "Model", "ModelType", "Tensor", "TensorMeta", "DataType", "Format", "Communicator", "SingleCommunicator",
        "OrchestratorError", "ConfigError", "ConfigTypeError", "InputError", "InputTypeError", "ModelError", "ModelNotFoundError", "ProviderError",
        "CommError", "CommTimeoutError", "PeerLostError", "RankTableError", "ShardError",
        "RemoteError", "RemoteTraceback", "load_config", "rank_main", "environment_variables",
    } <= set(dir(ranks))


def test_each_package_owns_its_errors_and_orchestrator_reexports_them_all():
    import launchers

    errors = {"LaunchError", "LaunchInterruptedError", "LaunchTimeoutError", "RankFailedError"}
    assert errors <= set(dir(launchers)) and not errors & set(dir(ranks))
    workers = {"WorkerError", "WorkerLostError", "WorkerTimeoutError", "PoolQueueFullError", "PoolClosedError"}
    assert not workers & set(dir(ranks))
    for name in errors | workers | {"ConfigError", "InputError", "ModelError", "CommError", "ShardError"}:
        error = getattr(orchestrator, name)
        assert issubclass(error, ranks.OrchestratorError), name
    assert orchestrator.LaunchError is launchers.LaunchError


def test_orchestrator_exports_are_explicit():
    text = (ROOT / "orchestrator" / "__init__.py").read_text()
    assert "import *" not in text


def test_orchestrator_reexports_the_mindspore_lite_surface():
    for name in ("Context", "Model", "ModelParallelRunner", "ModelType", "Tensor", "TensorMeta", "DataType", "Format",
                 "write_sample_model"):
        assert getattr(orchestrator, name) is not None
    assert orchestrator.Model is ranks.Model
    public = {name for name in dir(ranks) if not name.startswith("_")}
    assert public <= set(dir(orchestrator))


def test_init_modules_only_reexport():
    for package in ("ranks", "launchers", "orchestrator"):
        tree = ast.parse((ROOT / package / "__init__.py").read_text())
        for node in tree.body:
            assert isinstance(node, (ast.Import, ast.ImportFrom, ast.Expr, ast.Assign)), (
                f"{package}/__init__.py has a {type(node).__name__}; keep code in private modules"
            )


def test_ranks_does_not_import_upward():
    for path in (ROOT / "ranks").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(from|import) (orchestrator|launchers)\b", text, re.M), path


def test_launchers_does_not_import_orchestrator():
    for path in (ROOT / "launchers").glob("*.py"):
        assert not re.search(r"^\s*(from|import) orchestrator\b", path.read_text(), re.M), path


def test_environment_is_read_in_one_place():
    """Every variable the project reads goes through ranks/_env.py."""
    pattern = re.compile(r"os\.getenv\(|os\.environ\.get\(|os\.environ\[[^\]]+\](?!\s*=[^=])")
    offenders = []
    for package in ("ranks", "launchers", "orchestrator"):
        for path in (ROOT / package).glob("*.py"):
            if path.name == "_env.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "read these through ranks._env:\n" + "\n".join(offenders)


def test_environment_variables_are_documented():
    for var in ranks.environment_variables():
        # Open MPI's MCA parameters keep their lower-case names after the prefix.
        assert var.help and (var.name.isupper() or re.fullmatch(r"(OMPI|PRTE|PMIX)_MCA_[a-z0-9_]+", var.name)), var.name


def test_every_variable_the_shell_scripts_read_is_declared():
    declared = {var.name for var in ranks.environment_variables()}
    for script in (ROOT / "launchers").glob("*.sh"):
        read = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*):-", script.read_text()))
        assert read <= declared, f"{script.name} reads {sorted(read - declared)}, not declared in ranks/_env.py"
