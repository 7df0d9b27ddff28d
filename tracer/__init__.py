"""diffsplit.tracer: record a local run and explain every model object as a recipe.

Entry points: ``session.tracing()`` / ``session.trace(fn, ...)`` (a :class:`~.session.Trace`
with ``recipe(obj)``, ``report()``), ``recipe.Recipe`` (plain, versioned data),
``categories.categorize`` (normal / intermediate / model), ``errors.NotOffloadable``.
Modules are imported on demand; importing this package does nothing else.
"""
