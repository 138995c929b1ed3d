"""Root conftest: in a clone, the evals suite's pytest plugin (options, fixtures, report) is loaded from here.
Installed, the same module is registered by its `pytest11` entry point under this very name, and pytest skips a
plugin name it already has (PytestPluginManager.import_plugin), so the options are added once either way."""

pytest_plugins = ["ane_eval.pytest_plugin"]


def pytest_configure(config):
    # tests/ and evals/ run offline (set here, before collection imports any HF library)
    from ane_eval.pytest_plugin import offline_defaults

    offline_defaults()
