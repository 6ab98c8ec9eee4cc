"""Safety: bounded YAML, run-folder ownership and atomic writes, the code-trust policy, isolated subprocesses."""
