"""Fixtures of the evals suite on top of the ane_eval pytest plugin (ane_eval/pytest_plugin.py: options, the
session's model, the task helper and the report): the suite's tasks and tensors as parametrized cases, and the
model with a state reset for every test."""
from __future__ import annotations

import pytest

from ane_eval.pytest_plugin import offline_defaults, session_of
from ane_eval.suite import TaskSpec

offline_defaults()  # also when the suite runs installed (pytest --pyargs ane_eval.evals), without the root conftest


def pytest_configure(config):
    config.addinivalue_line("markers", "ane_task(name): an lm-eval task case of the evals suite")


def pytest_generate_tests(metafunc):
    if "task_spec" in metafunc.fixturenames:
        specs = session_of(metafunc.config).tasks
        metafunc.parametrize("task_spec", specs, ids=[t.name for t in specs])
    if "tensor_key" in metafunc.fixturenames:
        try:
            expected, declared = _contract_view(metafunc.config)
        except (ValueError, OSError) as e:  # reported by the test, in one line, not as a collection traceback
            metafunc.parametrize("tensor_key", [str(e).splitlines()[0]], ids=["model-unavailable"])
            return
        keys = sorted(set(expected) | set(declared))
        metafunc.parametrize("tensor_key", keys, ids=["-".join(k) for k in keys])


def _contract_view(config) -> tuple[dict, dict]:
    """(expected, declared) tensor interfaces of the model directory, from its specs alone (no model load), so
    the contract tests can be parametrized one per part, function and tensor at collection time."""
    s = session_of(config)
    if not hasattr(s, "contract_view"):
        s.contract_view = _read_contract_view(s)
    return s.contract_view


def _read_contract_view(s) -> tuple[dict, dict]:
    """Expected shapes from config.json and meta.yaml (contract.expected_geometry), declared ones from the parts:
    two independent sources, so a part that declares a wrong shape fails its test."""
    from ane_eval import contract
    from ane_eval.backends import resolve
    from ane_eval.bundle import discover
    from ane_eval.model import resolve_model

    bundle = discover(resolve_model(s.model_arg), backend=resolve(s.backend))
    geometry, s.contract_unknown = contract.expected_geometry(bundle)
    return (contract.expected_interface(geometry, len(bundle.chunks)),
            contract.declared_interface(contract.describe_parts(bundle)))


@pytest.fixture(scope="session")
def contract_view(request) -> tuple[dict, dict]:
    try:
        return _contract_view(request.config)
    except (ValueError, OSError) as e:
        pytest.fail(str(e).splitlines()[0], pytrace=False)


@pytest.fixture(scope="session")
def model_dir(ane_model_dir):
    return ane_model_dir


@pytest.fixture(scope="session")
def model_info(ane_model_info):
    return ane_model_info


@pytest.fixture(scope="session")
def model_loader(ane_model_loader):
    return ane_model_loader


@pytest.fixture()
def model(ane_model):
    """The session's model with a clean state: nothing from an earlier test can leak into this one."""
    ane_model.reset()
    yield ane_model
    ane_model.reset()


@pytest.fixture()
def task_case(task_spec: TaskSpec, ane_session):
    """The effective settings of one task case (command line over suite file)."""
    return TaskSpec(task_spec.name,
                    ane_session.num_fewshot if ane_session.num_fewshot is not None else task_spec.num_fewshot,
                    ane_session.limit if ane_session.limit is not None else task_spec.limit,
                    task_spec.thresholds)


def pytest_benchmark_update_machine_info(config, machine_info):
    from ane_eval.backends import chip_name

    machine_info["chip"] = chip_name()
