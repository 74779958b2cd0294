"""The Python tasks of the benchmarks (imported by the workers' python runner: ``orch worker --import``)."""


def noop() -> int:
    return 1
