"""The core stands alone: ``import neuraldb`` imports no ``evals``/``properties`` module, the
command line names its sub-commands in one table of lazy ``"module:function"`` targets, and a
sub-command whose module cannot be imported fails loudly (and only that one)."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from neuraldb import cli

REPO = Path(__file__).resolve().parents[1]
OUTSIDE_THE_CORE = ("evals", "properties")

# Where neuraldb/ may name evals or properties (file, enclosing function or assignment target).
ALLOWED = {
    ("__init__.py", "evaluate"),  # the documented façades: import inside the function body
    ("__init__.py", "gate"),
    ("__init__.py", "save_release"),
    ("__init__.py", "load_release"),
    ("cli.py", "COMMANDS"),  # the sub-command registration table
    ("cli.py", "_load_facts"),  # `neuraldb edit --facts` reading a CounterFact/ZsRE file
}

_PROBE = """
import importlib, json, pkgutil, sys
import neuraldb
for name in neuraldb._LAZY:                      # every lazy attribute
    getattr(neuraldb, name)
for mod in pkgutil.iter_modules(neuraldb.__path__):   # every module of the package
    importlib.import_module("neuraldb." + mod.name)
from neuraldb import cli
try:
    cli.main(["--help"])
except SystemExit as exc:
    assert exc.code == 0, exc.code
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("evals", "properties"))))
"""


def _outside(name: str | None) -> bool:
    return bool(name) and name.split(".")[0] in OUTSIDE_THE_CORE


def test_import_neuraldb_imports_no_evals_or_properties():
    code = ('import neuraldb, sys\n'
            'assert not any(m == "evals" or m.startswith(("evals.", "properties")) for m in sys.modules), '
            'sorted(m for m in sys.modules if m.startswith(("evals", "properties")))\n')
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_no_core_module_nor_the_help_imports_evals_or_properties():
    """Every neuraldb module and lazy attribute imported, and ``neuraldb --help`` printed."""
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout.strip().splitlines()
    assert json.loads(out[-1]) == [], out[-1]
    assert all(name in done.stdout for name in cli.COMMANDS)


def _enclosing_names(tree: ast.Module) -> dict[ast.AST, str]:
    """Node -> the name of the top-level function, class or assignment it sits in."""
    owner: dict[ast.AST, str] = {}
    for top in tree.body:
        if isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = top.name
        elif isinstance(top, ast.Assign) and isinstance(top.targets[0], ast.Name):
            name = top.targets[0].id
        elif isinstance(top, ast.AnnAssign) and isinstance(top.target, ast.Name):
            name = top.target.id
        else:
            name = "<module>"
        for node in ast.walk(top):
            owner[node] = name
    return owner


def _mentions(tree: ast.Module) -> list[tuple[ast.AST, str]]:
    """Imports of evals/properties, import_module/__import__ calls on them, and module-path strings."""
    found = []
    dotted = re.compile(r"(evals|properties)(\.\w+)*(:\w+)?")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node, f"import {a.name}") for a in node.names if _outside(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _outside(node.module):
            found.append((node, f"from {node.module} import ..."))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and dotted.fullmatch(node.value):
            found.append((node, f"the string {node.value!r}"))
    return found


def test_import_graph_core_names_evals_only_in_the_facades_and_the_command_table():
    offences, seen = [], set()
    for path in sorted((REPO / "neuraldb").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        owner = _enclosing_names(tree)
        for node, what in _mentions(tree):
            where = (path.name, owner.get(node, "<module>"))
            if where in ALLOWED:
                seen.add(where)
            else:
                offences.append(f"neuraldb/{path.name}:{node.lineno} ({where[1]}): {what}")
    assert not offences, "the core names evals/properties outside its façades and COMMANDS:\n" + "\n".join(offences)
    assert {w for w in ALLOWED if w[1] != "_load_facts"} <= seen  # the test still sees what it allows


def test_the_facades_are_functions_that_import_evals_when_called(tmp_path):
    import inspect

    import neuraldb

    for name, module in (("evaluate", "evals.evaluate"), ("gate", "evals.gate"),
                         ("save_release", "evals.release"), ("load_release", "evals.release")):
        facade = getattr(neuraldb, name)
        assert inspect.isfunction(facade) and facade.__module__ == "neuraldb", name
        assert name in neuraldb.__all__ and module in facade.__doc__, name
    with pytest.raises(Exception) as exc:  # reaches evals.release.load_release
        neuraldb.load_release(tmp_path / "missing")
    assert type(exc.value).__module__.startswith("evals") and "missing" in str(exc.value)


# ----------------------------------------------------------------------------- the command table


@pytest.fixture
def broken_module(tmp_path, monkeypatch):
    """A module that raises ImportError when imported, importable as ``neuraldb_broken_cmd``."""
    (tmp_path / "neuraldb_broken_cmd.py").write_text(
        "raise ImportError(\"cannot import name 'Policy' from 'evals.policy' (simulated breakage)\")\n")
    (tmp_path / "neuraldb_needs_dependency.py").write_text("import neuraldb_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("neuraldb_broken_cmd", "neuraldb_needs_dependency"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return "neuraldb_broken_cmd"


def test_a_broken_subcommand_fails_loudly_and_help_still_lists_it(broken_module, monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "gate", cli.Command("decide whether a store may be released",
                                                          f"{broken_module}:add_gate_arguments",
                                                          f"{broken_module}:run_gate"))
    assert cli.main(["gate", "--report", "r.json"]) == cli.EXIT_NOT_LOADED == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "simulated breakage" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("neuraldb gate: error:") and broken_module in last and "ImportError" in last, last
    assert cli.main(["-v", "gate", "--help"]) == 3  # its own help needs its module: loud too
    assert broken_module in capsys.readouterr().err

    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name, command in cli.COMMANDS.items():
        assert re.search(rf"^\s+{re.escape(name)}\s", out, re.M), f"--help does not list {name}:\n{out}"
    assert "decide whether a store may be released" in out

    with pytest.raises(SystemExit) as exc:  # the other sub-commands still work
        cli.main(["compare", "--help"])
    assert exc.value.code == 0 and "neuraldb compare" in capsys.readouterr().out


def test_a_missing_function_or_dependency_is_named(broken_module, monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "study", cli.Command("s", "neuraldb.cli:_add_demo_arguments",
                                                           "neuraldb.cli:no_such_function"))
    assert cli.main(["study"]) == 3
    assert "neuraldb.cli has no function 'no_such_function'" in capsys.readouterr().err
    monkeypatch.setitem(cli.COMMANDS, "study", cli.Command("s", "neuraldb_needs_dependency:add",
                                                           "neuraldb_needs_dependency:run"))
    assert cli.main(["study"]) == 3
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "ModuleNotFoundError" in last and "neuraldb_no_such_dependency" in last and "neuraldb[eval]" in last


def test_every_registered_subcommand_loads_and_parses_its_help(capsys):
    for name in cli.COMMANDS:
        add_arguments, run = cli.load_command(name)
        assert callable(run), name
        parser = cli.build_parser(name)
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([name, "--help"])
        assert exc.value.code == 0, name
        assert f"neuraldb {name}" in capsys.readouterr().out


def test_harness_subcommand_runs_lm_evals_command_line(tmp_path, capsys):
    assert cli.main(["harness", "--", "--help"]) == 0
    assert "lm-eval" in capsys.readouterr().out
    assert cli.main(["harness", "--data_dir", str(tmp_path / "missing"), "--", "--tasks", "sciq"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_fire_rate_subcommand_checks_its_arguments(capsys):
    assert cli.main(["fire-rate", "--n", "0"]) == 2
    assert "--n must be between 1 and 1,000,000" in capsys.readouterr().err
    from evals.firing.fire_rate import main as fire_rate_main

    with pytest.raises(SystemExit) as exc:  # `python -m evals.firing.fire_rate`: argparse's usage error
        fire_rate_main(["--n", "0"])
    assert exc.value.code == 2


def test_the_old_research_entry_points_warn_and_forward(capsys):
    """``python -m properties.fire_rate`` / ``properties.study`` still run: a FutureWarning naming
    the new command, then the moved module's ``main``."""
    import evals.firing.fire_rate
    import evals.firing.gate_variants
    from properties import fire_rate, study

    for shim, moved, command in ((fire_rate, evals.firing.fire_rate, "neuraldb fire-rate"),
                                 (study, evals.firing.gate_variants, "neuraldb gate-variants")):
        with pytest.warns(FutureWarning, match=command), pytest.raises(SystemExit) as exc:
            shim.main(["--help"])
        assert exc.value.code == 0 and moved.__name__ in capsys.readouterr().out


# ----------------------------------------------------------------------------- neuraldb edit

EDIT_FACTS = [{"prompt": "the city of {}", "subject": "the eiffel tower", "target_new": "rome", "id": "e1"},
              {"prompt": "the sport of {}", "subject": "lebron james", "target_new": "tennis", "id": "e2"}]


@pytest.fixture
def tiny_edit(monkeypatch, tmp_path):
    """``neuraldb edit`` on the tiny llama: (run(*argv) -> exit code, facts file, out path)."""
    import neuraldb
    from neuraldb import EditConfig

    from conftest import tiny_model

    monkeypatch.setattr(neuraldb, "load_model", lambda name, **kw: tiny_model("llama"))
    small = dict(steps=2, context_prefixes=("the",), context_length=2)
    monkeypatch.setattr(neuraldb, "EditConfig", lambda **kw: EditConfig(**(small | kw)))
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(EDIT_FACTS))

    def run(*argv):
        return cli.main(["edit", "--layer", "1", "--batch-size", "1", *map(str, argv)])

    return run, facts, tmp_path / "store.safetensors"


def test_edit_into_an_existing_store_needs_append(tiny_edit, tmp_path, capsys):
    from neuraldb import NeuralDB

    run, facts, out = tiny_edit
    assert run("--facts", facts, "--out", out, "--n", 1) == 0
    other = tmp_path / "other.json"
    other.write_text(json.dumps(EDIT_FACTS[1:]))
    capsys.readouterr()
    assert run("--facts", other, "--out", out) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--append" in err and "--resume" in err
    assert NeuralDB.load(out).ids == ["e1"]  # untouched
    assert run("--facts", other, "--out", out, "--append") == 0
    assert NeuralDB.load(out).ids == ["e1", "e2"]


@pytest.mark.parametrize("n", [-1, 0])
def test_edit_n_below_one_is_an_error(tiny_edit, capsys, n):
    run, facts, out = tiny_edit
    assert run("--facts", facts, "--out", out, "--n", n) == 2
    assert "--n" in capsys.readouterr().err and not out.exists()


def test_an_interrupted_edit_resumes_with_resume(tiny_edit, monkeypatch, capsys):
    from neuraldb import NeuralDB, editor

    run, facts, out = tiny_edit
    real, done = editor._edit_batch, []

    def interrupted(*args, **kwargs):
        if done:
            raise KeyboardInterrupt
        done.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(editor, "_edit_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run("--facts", facts, "--out", out)
    monkeypatch.setattr(editor, "_edit_batch", real)
    capsys.readouterr()
    assert run("--facts", facts, "--out", out) == 2  # an unfinished run is not silently continued ...
    assert "--resume" in capsys.readouterr().err
    assert run("--facts", facts, "--out", out, "--resume") == 0  # ... but continued when asked
    assert NeuralDB.load(out).ids == ["e1", "e2"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["facts.json", "store.safetensors"]  # no checkpoint


def test_a_truncated_facts_file_is_named_with_line_and_column(tiny_edit, tmp_path, capsys):
    run, _, out = tiny_edit
    bad = tmp_path / "facts.json"
    bad.write_text(json.dumps(EDIT_FACTS)[:40])
    assert run("--facts", bad, "--out", out) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "line 1 column" in err


def test_edit_chat_residuals_flag_reaches_the_config(tiny_edit, monkeypatch):
    import neuraldb

    run, facts, out = tiny_edit
    seen, real = [], neuraldb.edit
    monkeypatch.setattr(neuraldb, "edit", lambda *a, config, **kw: seen.append(config) or real(*a, config=config, **kw))
    assert run("--facts", facts, "--out", out, "--chat-residuals") == 0
    assert seen[-1].chat_residuals is True
    assert run("--facts", facts, "--out", out.with_name("plain.safetensors")) == 0
    assert seen[-1].chat_residuals is False


# ----------------------------------------------------------------------------- neuraldb forget

SIBLINGS = [{"prompt": "the sport of {}", "subject": "lebron james", "target_new": "tennis", "id": "s1"},
            {"prompt": "{} is a citizen of", "subject": "lebron james", "target_new": "japan", "id": "s2"},
            {"prompt": "the city of {}", "subject": "the eiffel tower", "target_new": "rome", "id": "e1"}]


@pytest.fixture
def forget_store(tiny_edit, tmp_path):
    """A tiny-llama store of SIBLINGS (two facts about one subject, one alone): (run forget, store path)."""
    run, facts, out = tiny_edit
    facts.write_text(json.dumps(SIBLINGS))
    assert run("--facts", facts, "--out", out) == 0

    def forget(*argv):
        return cli.main(["forget", "--store", str(out), *map(str, argv)])

    return forget, out


def test_forget_by_subject_and_prompt_removes_it_and_refits_its_sibling(forget_store, capsys):
    import torch

    from neuraldb import NeuralDB

    forget, out = forget_store
    before = NeuralDB.load(out)
    capsys.readouterr()
    assert forget("--subject", "lebron james", "--prompt", "the sport of {}") == 0
    printed = capsys.readouterr().out
    assert "1 removed, 1 re-fitted" in printed and "removed s1" in printed and "re-fitted s2" in printed
    after = NeuralDB.load(out)  # written in place
    assert after.ids == ["s2", "e1"]
    i, j = before.ids.index("s2"), after.ids.index("s2")
    assert not torch.equal(before.residuals[i], after.residuals[j])  # the sibling's residual was optimised again
    assert torch.equal(before.keys[i], after.keys[j])  # its key is not
    k, m = before.ids.index("e1"), after.ids.index("e1")
    assert torch.equal(before.residuals[k], after.residuals[m])  # another subject is untouched


def test_forget_by_id_into_another_file_leaves_the_store(forget_store, tmp_path):
    from neuraldb import NeuralDB

    forget, out = forget_store
    other = tmp_path / "forgotten.safetensors"
    assert forget("--id", "e1", "--out", other) == 0
    assert NeuralDB.load(other).ids == ["s1", "s2"]
    assert NeuralDB.load(out).ids == ["s1", "s2", "e1"]


@pytest.mark.parametrize("argv, says", [
    (["--id", "e1", "--id", "nope"], "nope"),  # one stored, one not: neither goes
    (["--subject", "lebron james", "--prompt", "{} was born in"], "was born in"),
    (["--subject", "lebron james"], "--prompt"),
    ([], "--id"),
])
def test_forget_what_is_not_stored_is_an_error_and_removes_nothing(forget_store, capsys, argv, says):
    from neuraldb import NeuralDB

    forget, out = forget_store
    capsys.readouterr()
    assert forget(*argv) == 2
    assert says in capsys.readouterr().err
    assert NeuralDB.load(out).ids == ["s1", "s2", "e1"]


def test_edit_memory_budget_flag_reaches_the_config(tiny_edit, monkeypatch, capsys):
    import neuraldb

    run, facts, out = tiny_edit
    seen, real = [], neuraldb.edit
    monkeypatch.setattr(neuraldb, "edit", lambda *a, config, **kw: seen.append(config) or real(*a, config=config, **kw))
    assert run("--facts", facts, "--out", out, "--memory-budget-gb", 1.5) == 0
    assert seen[-1].memory_budget_gb == 1.5
    assert run("--facts", facts, "--out", out.with_name("unbounded.safetensors"), "--memory-budget-gb", 0) == 0
    assert seen[-1].memory_budget_gb is None  # 0 = no bound
    capsys.readouterr()
    assert run("--facts", facts, "--out", out.with_name("bad.safetensors"), "--memory-budget-gb", -1) == 2
    assert "memory_budget_gb" in capsys.readouterr().err


def test_edit_early_stop_flag_reaches_the_config_and_is_stored(tiny_edit, monkeypatch, capsys):
    import neuraldb

    run, facts, out = tiny_edit
    seen, real = [], neuraldb.edit
    monkeypatch.setattr(neuraldb, "edit", lambda *a, config, **kw: seen.append(config) or real(*a, config=config, **kw))
    assert run("--facts", facts, "--out", out, "--early-stop", "loss") == 0
    assert seen[-1].early_stop == "loss" and neuraldb.NeuralDB.load(out).config["early_stop"] == "loss"
    assert run("--facts", facts, "--out", out.with_name("default.safetensors")) == 0
    assert seen[-1].early_stop == "nll"
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run("--facts", facts, "--out", out.with_name("bad.safetensors"), "--early-stop", "kl")
    assert "--early-stop" in capsys.readouterr().err
