"""Tasks whose answers a program can check: prompt generators and verifiers (rewards, judges, evaluation)."""
