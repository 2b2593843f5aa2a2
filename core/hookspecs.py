"""Every hook a handoff plugin can implement.

A plugin is a module (or object) registered with the plugin manager, usually found through the
``handoff.backends`` entry-point group of its distribution::

    # pyproject.toml of handoff-acme
    [project.entry-points."handoff.backends"]
    acme = "handoff_acme.plugin"

and implements some of the hooks below with :data:`handoff.hookimpl`. The module named by the
entry point is imported by ``handoff.runtime`` too, so it must not import torch or a vendor
compiler at module level: put those behind the import paths of :class:`handoff.BackendSpec`.

The ahead-of-time work of a backend is not a hook but its :class:`handoff.Compiler` (``support``,
``check_partition``, ``preprocess``...): one instance serves a whole ``partition`` run, so work
``support`` did may be carried to ``preprocess`` on it, guided by :func:`handoff.partition_source`
(docs/plugins.md, "Carrying work from support to preprocess").

A function marked ``@hookimpl`` whose name is not one of these hooks (``handoff_backend`` for
``handoff_backends``) is an error: the plugin is listed as broken, naming the hook, instead of
its backend silently not appearing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import pluggy

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .backend import BackendSpec
    from .report import Report
    from .zoo import ResolvedModel, ZooModel

PROJECT = "handoff"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def handoff_backends() -> Sequence[BackendSpec]:
    """Declare the backends this plugin provides.

    Called once per plugin manager, at discovery; keep it cheap (no imports of torch or a vendor
    SDK). Plugins registered with ``trylast`` (the built-in ``tvm`` backend) are listed last.

    :return: a list of :class:`handoff.BackendSpec`; ids must be unique across all plugins.

    Example::

        @hookimpl
        def handoff_backends():
            return [BackendSpec(id="acme", version="1.0", device="npu", api_version="2.0",
                                compiler="handoff_acme.compiler:AcmeCompiler",
                                runtime="handoff_acme.runtime:AcmeRuntime",
                                options={"cores": Option("int", "NPU cores to use", default=4, min=1, max=4)})]
    """


@hookspec
def handoff_catalog() -> Mapping[str, Mapping[str, object]]:
    """Describe the backends this plugin provides for the catalogue.

    Shown by ``handoff backends`` and used in messages: where the runtime half runs, the vendor
    compiler, how to install it.

    An entry from an installed plugin replaces ``registry.yaml``'s entry for the same backend, so
    an out-of-tree vendor needs no change to the core; ``registry.yaml`` keeps presets and entries
    for backends that are not installed. An entry with a missing or ill-typed field is reported by
    ``handoff backends`` and skipped, never fatal.

    :return: backend id -> entry with the fields ``distribution`` (pip name), ``module`` (import
        package), ``entry_point`` (``handoff.backends`` name), ``device`` (cpu|gpu|npu),
        ``platforms`` (list, e.g. ``["linux-x86_64", "macos-arm64"]``), ``compiler``
        (``{"name": ..., "version": ...}``), ``install`` (the command that installs it) and
        ``description``; optionally ``tvm_target`` for backends that generate code with TVM.

    Example::

        @hookimpl
        def handoff_catalog():
            return {"acme": {"distribution": "handoff-acme", "module": "handoff_acme",
                             "entry_point": "acme", "device": "npu", "platforms": ["linux-aarch64"],
                             "compiler": {"name": "acme-sdk", "version": "3.1"},
                             "install": "pip install handoff-acme",
                             "description": "Acme NPU through acme-sdk 3.1"}}
    """


@hookspec
def handoff_zoo_models() -> Mapping[str, ZooModel]:
    """Add built-in models, reachable as ``zoo:NAME`` on the command line.

    :return: a mapping of name to :class:`handoff.zoo.ZooModel`. A name already taken by another
        plugin is an error naming both plugins.

    Example::

        @hookimpl
        def handoff_zoo_models():
            return {"acme_kws": ZooModel(factory=make_kws, inputs=(((1, 49, 10), "float32"),),
                                         description="keyword spotting CNN")}
    """


@hookspec(firstresult=True)
def handoff_resolve_model(spec: str, input_shapes: Sequence[tuple[tuple[int, ...], str]],
                          zoo: Mapping[str, ZooModel], trust_model: bool) -> ResolvedModel | None:
    """Turn the MODEL argument of ``handoff partition`` into a module or exported program.

    ``firstresult``: the first plugin returning something other than ``None`` wins. The core's own
    implementation (``.pt2`` files, ``file.py:Name``, ``zoo:NAME``) runs ``trylast``, so a plugin can
    add sources such as ``hub:NAME`` or override how a path is read.

    :param spec: the MODEL argument as typed.
    :param input_shapes: parsed ``--input-shape`` options, ``((1, 3, 224, 224), "float32")`` each.
    :param zoo: every ``zoo:`` model of every plugin (see :func:`handoff_zoo_models`).
    :param trust_model: the user passed ``--trust-model``: the model file may run code when read
        (pickles). A model file is code the user runs; without this flag, refuse formats that
        would run code with a one-line reason naming ``--trust-model``.
    :return: a :class:`handoff.zoo.ResolvedModel`, or ``None`` when ``spec`` is not for this plugin.
        Raise ``ValueError`` with a one-line message when it is, but is broken.

    Example::

        @hookimpl
        def handoff_resolve_model(spec, input_shapes):
            if spec.startswith("acme:"):
                return ResolvedModel(name=spec, module=load_acme(spec[5:]), example_inputs=(...,))
    """


@hookspec
def handoff_report(report: Report) -> None:
    """Inspect or annotate the delegation report once partitioning and lowering are done.

    Called before the report is printed or written with ``--report``. Append human-readable lines
    to ``report.notes`` (they are shown under the table and kept in the JSON); do not change the
    counts.

    :param report: the :class:`handoff.report.Report` of this ``partition`` run.
    :return: nothing.

    Example::

        @hookimpl
        def handoff_report(report):
            if report.coverage("acme") < 50:
                report.notes.append("acme: under half the graph runs on the NPU")
    """


__all__ = ["PROJECT", "hookimpl", "hookspec", "handoff_backends", "handoff_catalog", "handoff_zoo_models",
           "handoff_resolve_model", "handoff_report"]
