"""MindSpore Serving's Python client, on our copy of its protocol.

    from orchestrator.serving.client import Client
    client = Client("localhost", 5500, "add", "add_common")      # 1.2's form; 1.3's: Client("localhost:5500", "add", "add_common")
    result = client.infer([{"x1": x1, "x2": x2}, ...])
    # [{'y': array(...)}, ...]; an instance that failed: {'error': '...'}; a request that failed: {'error': '...'}

As MindSpore Serving's client does, ``infer`` returns errors instead of
raising them (a failed request, a gRPC failure), but every call has a timeout
(``timeout`` seconds, default ORCH_TIMEOUT) where that client waited forever.
"""

from __future__ import annotations

import inspect

import grpc

from ranks._env import default_timeout

from ._grpc_service import message_options
from ._proto import ms_service_pb2 as pb
from ._proto import ms_service_pb2_grpc as pb_grpc
from ._tensors import from_tensor, to_tensor

__all__ = ["Client"]


def _check(name: str, value, kind, low=None, high=None):
    if isinstance(value, bool) or not isinstance(value, kind) or (kind is str and not value):
        what = "a non-empty str" if kind is str else f"an {kind.__name__}" if kind is int else f"a {kind.__name__}"
        raise RuntimeError(f"Parameter '{name}' should be {what}, "
                           f"but actually {value!r}")
    if low is not None and (value < low or (high is not None and value > high)):
        raise RuntimeError(f"Parameter '{name}' should be in range [{low}, {high if high is not None else 'inf'}], "
                           f"but actually {value}")


def _signature_12(ip, port, servable_name, method_name, version_number=0, max_msg_mb_size=512, *, timeout=None):
    """MindSpore Serving 1.2's ``Client``."""


def _signature_13(address, servable_name, method_name, version_number=0, ssl_config=None, *, timeout=None):
    """MindSpore Serving 1.3's (and later) ``Client``."""


_SIGNATURES = {"1.2": inspect.signature(_signature_12), "1.3": inspect.signature(_signature_13)}


def _bind(args: tuple, kwargs: dict) -> tuple[str, dict]:
    """Which MindSpore Serving ``Client`` signature the arguments are written for, and their values by name.

    The 1.3 form when ``address`` is named, or when the first argument is a ``host:port`` string not followed by
    a port; the 1.2 form otherwise. Arguments neither form takes are a TypeError naming both forms."""
    second = args[1] if len(args) > 1 else None
    address_form = "address" in kwargs or (
        "ip" not in kwargs and "port" not in kwargs and args and isinstance(args[0], str) and ":" in args[0]
        and not (isinstance(second, int) and not isinstance(second, bool)))
    form = "1.3" if address_form else "1.2"
    try:
        bound = _SIGNATURES[form].bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(
            f"Client() arguments fit neither of MindSpore Serving's forms ({exc}): Client(ip, port, servable_name, "
            f"method_name, version_number=0, max_msg_mb_size=512) or Client(address, servable_name, method_name, "
            f"version_number=0, ssl_config=None); both also take timeout=seconds") from None
    bound.apply_defaults()
    return form, dict(bound.arguments)


class Client:
    """A client of one method of one servable, in either of MindSpore Serving's forms.

    ``Client(ip, port, servable_name, method_name, version_number=0, max_msg_mb_size=512)`` (MindSpore Serving
    1.2) or ``Client(address, servable_name, method_name, version_number=0, ssl_config=None)`` (1.3 on, address
    ``"host:port"``). ``version_number`` 0: the newest version served. ``timeout`` (ours, either form): seconds
    per call, default ORCH_TIMEOUT.

    Outputs come back as the form's own client gives them: a numeric output of shape [] or [1] is a numpy
    scalar from the 1.2 form and an array of that shape from the 1.3 form (1.3 changed this); strings and bytes
    are a single value when there is one and a list otherwise, in both.
    """

    def __init__(self, *args, **kwargs):
        form, values = _bind(args, kwargs)
        if form == "1.3":
            _check("address", values["address"], str)
            host, colon, port_text = values["address"].rpartition(":")
            if not colon or not host or not port_text.isdigit():
                raise RuntimeError(f"Parameter 'address' should be 'host:port', but actually {values['address']!r}")
            ip, port, max_mb = host.strip("[]"), int(port_text), 512
            if values["ssl_config"] is not None:
                raise RuntimeError("ssl_config: this project's servers speak plain gRPC (no TLS); pass ssl_config=None "
                                   "and put a TLS-terminating proxy in front of the server if you need encryption")
        else:
            ip, port, max_mb = values["ip"], values["port"], values["max_msg_mb_size"]
            _check("ip", ip, str)
        _check("port", port, int, 0, 65535)
        _check("servable_name", values["servable_name"], str)
        _check("method_name", values["method_name"], str)
        _check("version_number", values["version_number"], int, 0)
        _check("max_msg_mb_size", max_mb, int, 1, 512)
        self.form = form
        self.ip, self.port = ip, port
        self.servable_name = values["servable_name"]
        self.method_name = values["method_name"]
        self.version_number = values["version_number"]
        timeout = values["timeout"]
        self.timeout = default_timeout() if timeout is None else float(timeout)
        target = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        self._channel = grpc.insecure_channel(target, options=message_options(max_mb * 2**20))
        self._stub = pb_grpc.MSServiceStub(self._channel)

    def _request(self, instances) -> pb.PredictRequest:
        if not isinstance(instances, (tuple, list)):
            instances = (instances,)
        request = pb.PredictRequest()
        request.servable_spec.name = self.servable_name
        request.servable_spec.method_name = self.method_name
        request.servable_spec.version_number = self.version_number
        for i, item in enumerate(instances):
            if not isinstance(item, dict):
                raise RuntimeError(f"instance {i} should be a dict {{input name: value}}, but actually {type(item).__name__}")
            instance = request.instances.add()
            for name, value in item.items():
                try:
                    to_tensor(value, instance.items[name], name=f"instance {i} input {name!r}")
                except Exception as exc:  # noqa: BLE001 - MindSpore Serving's client raises RuntimeError here
                    raise RuntimeError(str(exc)) from exc
        return request

    def infer(self, instances):
        """Send ``instances`` (a dict, or a list of dicts {input name: value}); a list of output dicts, or {"error": ...}."""
        request = self._request(instances)
        try:
            reply = self._stub.Predict(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            return self._rpc_error(exc)
        return self._parse(reply)

    def infer_async(self, instances):
        """Send without waiting; ``.result()`` of the returned object gives what ``infer`` returns."""
        return _AsyncResult(self, self._stub.Predict.future(self._request(instances), timeout=self.timeout))

    def _rpc_error(self, exc: grpc.RpcError) -> dict:
        # MindSpore Serving's text (grpc's StatusCode value is a tuple: "Grpc Error, (14, 'unavailable'), ..."),
        # so scripts that look for it still find it; then which server was called.
        code = exc.code()
        return {"error": f"Grpc Error, {code.value if code is not None else '?'}, {exc.details()} "
                         f"(calling {self.ip}:{self.port})"}

    def _parse(self, reply: pb.PredictReply):
        errors = list(reply.error_msg)
        if len(errors) == 1:
            return {"error": bytes(errors[0].error_msg).decode("utf-8", "replace")}
        if errors and len(errors) != len(reply.instances):
            raise RuntimeError(f"the reply has {len(errors)} error messages for {len(reply.instances)} instances")
        result = []
        for i, instance in enumerate(reply.instances):
            if errors and errors[i].error_code != 0:
                result.append({"error": bytes(errors[i].error_msg).decode("utf-8", "replace")})
            else:
                result.append({k: from_tensor(t, k, scalars=self.form == "1.2") for k, t in instance.items.items()})
        return result

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _AsyncResult:
    def __init__(self, client: Client, future):
        self._client, self._future = client, future

    def result(self):
        try:
            return self._client._parse(self._future.result())
        except grpc.RpcError as exc:
            return self._client._rpc_error(exc)
