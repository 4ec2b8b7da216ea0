"""What a ``servable_config.py`` calls: MindSpore Serving's ``register`` module.

    from orchestrator.serving.worker import register   # or: from orchestrator.serving import register

    register.declare_servable(servable_file="tensor_add.onnx", model_format="ONNX", with_batch_dim=False)

    @register.register_method(output_names=["y"])
    def add_cast(x1, x2):
        x1, x2 = register.call_preprocess(to_float32, x1, x2)
        y = register.call_servable(x1, x2)
        return y

A method runs once per instance of a request, on that instance's inputs (numpy
arrays, str or bytes); ``call_servable`` runs the model on them (joined with
other instances into one batch when the servable has ``with_batch_dim=True``).
"""

from __future__ import annotations

from ._declarations import MODEL_FORMATS, ServableDeclaration, current, method_def, running_servable
from ._errors import ServableConfigError

__all__ = ["declare_servable", "register_method", "call_preprocess", "call_preprocess_pipeline", "call_servable",
           "call_postprocess", "call_postprocess_pipeline"]


def declare_servable(servable_file, model_format, with_batch_dim=True, options=None, without_batch_dim_inputs=None):
    """Declare the model of this servable: a file in each version folder, its format, whether dim 0 is the batch.

    Args:
        servable_file: the model's file name inside a version folder (``add/1/tensor_add.onnx``).
        model_format: ``"ONNX"`` or ``"MindIR"`` (converted to ONNX through MindSpore once and cached
            beside the file: the ``mindspore`` extra; see ``ranks._mindir``).
        with_batch_dim: True: every input and output has the batch in dimension 0; an
            instance carries one row, and instances are joined into batches. False: an
            instance is the model's whole input.
        options, without_batch_dim_inputs: accepted for MindSpore Serving's scripts;
            ``without_batch_dim_inputs`` (input indexes) are taken from the first instance of a batch.
    """
    decl = current("declare_servable")
    if decl.servable is not None:
        raise ServableConfigError(f"{decl.source}: declare_servable was called twice; a servable has one model")
    if not isinstance(servable_file, str) or not servable_file:
        raise ServableConfigError(f"declare_servable: servable_file must be a file name (str), got {servable_file!r}")
    if not isinstance(model_format, str) or model_format.upper() not in MODEL_FORMATS:
        raise ServableConfigError(f"declare_servable: model_format must be 'ONNX' or 'MindIR', got {model_format!r}")
    if not isinstance(with_batch_dim, bool):
        raise ServableConfigError(f"declare_servable: with_batch_dim must be True or False, got {with_batch_dim!r}")
    if without_batch_dim_inputs is None:
        without = ()
    else:
        without = tuple([without_batch_dim_inputs] if isinstance(without_batch_dim_inputs, int) else without_batch_dim_inputs)
    decl.servable = ServableDeclaration(servable_file, model_format.upper(), with_batch_dim, options, without)


def register_method(output_names):
    """Register the decorated function as a method of this servable; its parameters are the method's inputs."""
    decl = current("register_method")

    def register(fn):
        method = method_def(fn, output_names)
        if method.name in decl.methods:
            raise ServableConfigError(f"{decl.source}: method {method.name!r} is registered twice")
        decl.methods[method.name] = method
        return fn

    return register


def call_preprocess(preprocess_fun, *args):
    """Run ``preprocess_fun(*args)`` on this instance's values; returns what it returns."""
    running_servable("call_preprocess")
    return preprocess_fun(*args)


def call_preprocess_pipeline(preprocess_fun, *args):
    """Run a pipeline function (it takes a list of instances, each a tuple, and yields one result each)."""
    running_servable("call_preprocess_pipeline")
    return _first(preprocess_fun, args)


def call_postprocess(postprocess_fun, *args):
    """Run ``postprocess_fun(*args)`` on this instance's values; returns what it returns."""
    running_servable("call_postprocess")
    return postprocess_fun(*args)


def call_postprocess_pipeline(postprocess_fun, *args):
    """Run a pipeline function (it takes a list of instances, each a tuple, and yields one result each)."""
    running_servable("call_postprocess_pipeline")
    return _first(postprocess_fun, args)


def call_servable(*args):
    """Run the servable's model on this instance's inputs, in the model's input order.

    Returns the one output, or a tuple when the model has several.
    """
    servable, deadline = running_servable("call_servable")
    outputs = servable.infer(args, deadline)
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _first(fn, args):
    for result in fn([tuple(args)]):
        return result
    raise ServableConfigError(f"pipeline function {getattr(fn, '__name__', fn)} yielded no result for its instance")
