"""`python -m orch` and the zipapp's entry point."""

from orch.cli import main

if __name__ == "__main__":
    main()
