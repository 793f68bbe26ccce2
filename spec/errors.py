"""The project's exception types for user mistakes.

Every layer may import this module. A ``SpecError`` carries one ``Problem``
per mistake found, each naming the file, the JSON path and what was expected,
so that one run reports all of them at once.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Problem:
    """One mistake in one document: where it is and what is wrong."""

    source: str
    path: str
    message: str

    def __str__(self):
        return f"{self.source}: {self.path}: {self.message}"


class SpecError(ValueError):
    """A search-space spec or derived spec that cannot be used.

    ``problems`` lists every mistake found, sorted by source and path order of
    discovery; ``str(error)`` is one line per problem.
    """

    def __init__(self, problems):
        if isinstance(problems, Problem):
            problems = [problems]
        self.problems = tuple(problems)
        if not self.problems:
            raise ValueError("SpecError needs at least one problem.")
        super().__init__("\n".join(str(p) for p in self.problems))

    @classmethod
    def single(cls, source, path, message):
        return cls([Problem(source, path, message)])


class DataError(ValueError):
    """A data source that is missing, malformed or does not fit the spec."""


class RunDirectoryError(ValueError):
    """A run directory that cannot be used as asked (it would lose results)."""
