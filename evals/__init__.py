"""The evals suite (also installed as ane_eval.evals: `pytest --pyargs ane_eval.evals`)."""
