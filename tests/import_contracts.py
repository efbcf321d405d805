"""Two import-linter contract types the built-in ones lack: an allow-list of outside packages, and every module on a floor.

`lint-imports` loads them from `pyproject.toml` (`contract_types`); it runs from the repository root,
which it puts on `sys.path`.
"""

from __future__ import annotations

import sys

from importlinter import Contract, ContractCheck, fields, output


def _modules_of(graph, package: str) -> set[str]:
    """`package` and, when it is a package, every module under it."""
    return {package} | (graph.find_descendants(package) if not graph.is_module_squashed(package) else set())


class AllowedOutsidePackages(Contract):
    """The source packages import nothing from outside the project but the standard library and `allowed`.

    Options: source_modules (packages), allowed (top-level names of outside packages).
    """

    type_name = "allowed_outside_packages"
    source_modules = fields.ListField(subfield=fields.StringField())
    allowed = fields.ListField(subfield=fields.StringField())

    def check(self, graph, verbose: bool) -> ContractCheck:
        project = {module.split(".")[0] for module in graph.modules if not graph.is_module_squashed(module)}
        allowed = set(self.allowed) | set(sys.stdlib_module_names)
        offending = []
        for package in self.source_modules:
            for module in sorted(_modules_of(graph, package)):
                for imported in sorted(graph.find_modules_directly_imported_by(module)):
                    top = imported.split(".")[0]
                    if top not in project and top not in allowed:
                        offending.append((module, top))
        return ContractCheck(kept=not offending, metadata={"offending": offending})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for module, outside in check.metadata["offending"]:
            output.print_error(f"{module} imports {outside}, which is not allowed on this floor")
            output.new_line()


class EveryModuleOnAFloor(Contract):
    """Every module directly under `container` is one of `modules`: a new module must be given its floor
    (in the layers contract, and here), or no contract constrains it.

    Options: container (a package), modules (its children's full names).
    """

    type_name = "every_module_on_a_floor"
    container = fields.StringField()
    modules = fields.ListField(subfield=fields.StringField())

    def check(self, graph, verbose: bool) -> ContractCheck:
        unlisted = sorted(graph.find_children(self.container) - set(self.modules))
        return ContractCheck(kept=not unlisted, metadata={"unlisted": unlisted})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for module in check.metadata["unlisted"]:
            output.print_error(f"{module} is on no floor: add it to the layers contract and to this list")
            output.new_line()
