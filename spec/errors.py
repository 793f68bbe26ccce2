"""The project's exception types.

Every layer may import this module. Each error carries one ``Problem`` per
mistake found, naming the file, the field (a JSON path such as
``$.data.path``, or a file inside a run directory) and what was expected, so
that one run reports all of them at once and the CLI prints every kind of
error the same way: ``<file>: <field>: <message>``, one line per problem.

A layer that knows the field but not the file raises with ``source=None``;
the caller that knows the file fills it in with ``with_source``.

==========================  ==================================  ==========
error                       what went wrong                     CLI exit
==========================  ==================================  ==========
``SpecError``               a spec or derived spec              2
``DataError``               data missing or not fitting a spec  2
``RunDirectoryError``       a run directory that cannot be      2
                            used as asked
``DivergenceError``         a NaN or infinite loss or gradient  3
``ExportVerificationError`` an exported model that disagrees    1
                            with the model it came from
==========================  ==================================  ==========
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Problem:
    """One mistake in one document: where it is and what is wrong."""

    source: str
    path: str
    message: str

    def __str__(self):
        if self.source is None:
            return f"{self.path}: {self.message}"
        return f"{self.source}: {self.path}: {self.message}"


class KerasDartsError(Exception):
    """Base of the project's errors: ``problems`` lists every mistake; ``str(error)`` is one line per problem."""

    exit_code = 1

    def __init__(self, problems):
        if isinstance(problems, Problem):
            problems = [problems]
        self.problems = tuple(problems)
        if not self.problems:
            raise ValueError(f"{type(self).__name__} needs at least one problem.")
        super().__init__("\n".join(str(p) for p in self.problems))

    @classmethod
    def single(cls, source, path, message):
        return cls([Problem(source, path, message)])

    def with_source(self, source):
        """The same error with ``source`` filled in where a problem has none."""
        if all(p.source is not None for p in self.problems):
            return self
        error = type(self)([Problem(source if p.source is None else p.source, p.path, p.message)
                            for p in self.problems])
        error.__cause__ = self.__cause__
        return error


class SpecError(KerasDartsError, ValueError):
    """A search-space spec or derived spec that cannot be used.

    ``problems`` are sorted by source and path order of discovery.
    """

    exit_code = 2


class DataError(KerasDartsError, ValueError):
    """A data source that is missing, malformed or does not fit the spec (the field is under ``$.data``)."""

    exit_code = 2


class RunDirectoryError(KerasDartsError, ValueError):
    """A run directory that cannot be used as asked (it would lose results, or lacks what a step needs).

    The source is the run directory; the field is the file or option concerned.
    """

    exit_code = 2


class DivergenceError(KerasDartsError, RuntimeError):
    """The search met a NaN or infinite loss or gradient (the field names the step and the quantity)."""

    exit_code = 3


class ExportVerificationError(KerasDartsError, RuntimeError):
    """An exported model, run in a fresh process, disagrees with the model it was exported from."""

    exit_code = 1
