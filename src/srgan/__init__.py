"""SRGAN experiment-tracking workflow: see docs/ARCHITECTURE.md for what each module owns."""
