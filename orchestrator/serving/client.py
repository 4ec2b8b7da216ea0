"""MindSpore Serving's Python client, on our copy of its protocol.

    from orchestrator.serving.client import Client
    client = Client("localhost", 5500, "add", "add_common")      # or Client("localhost:5500", "add", "add_common")
    result = client.infer([{"x1": x1, "x2": x2}, ...])
    # [{'y': array(...)}, ...]; an instance that failed: {'error': '...'}; a request that failed: {'error': '...'}

As MindSpore Serving's client does, ``infer`` returns errors instead of
raising them (a failed request, a gRPC failure), but every call has a timeout
(``timeout`` seconds, default ORCH_TIMEOUT) where that client waited forever.
"""

from __future__ import annotations

import grpc

from ranks._env import default_timeout

from ._grpc_service import message_options
from ._proto import ms_service_pb2 as pb
from ._proto import ms_service_pb2_grpc as pb_grpc
from ._tensors import from_tensor, to_tensor

__all__ = ["Client"]


def _check(name: str, value, kind, low=None, high=None):
    if isinstance(value, bool) or not isinstance(value, kind) or (kind is str and not value):
        raise RuntimeError(f"Parameter '{name}' should be a {'non-empty ' if kind is str else ''}{kind.__name__}, "
                           f"but actually {value!r}")
    if low is not None and (value < low or (high is not None and value > high)):
        raise RuntimeError(f"Parameter '{name}' should be in range [{low}, {high if high is not None else 'inf'}], "
                           f"but actually {value}")


class Client:
    """A client of one method of one servable.

    ``Client(ip, port, servable_name, method_name, version_number=0, max_msg_mb_size=512)``
    (MindSpore Serving 1.2) or ``Client("ip:port", servable_name, method_name, ...)`` (1.3 on).
    ``version_number`` 0: the newest version served. ``timeout``: seconds per call.
    """

    def __init__(self, *args, version_number: int = 0, max_msg_mb_size: int = 512, timeout: float | None = None,
                 **kwargs):
        args = list(args)
        if args and isinstance(args[0], str) and len(args) >= 2 and isinstance(args[1], int) and not isinstance(args[1], bool):
            ip, port = args[0], args[1]
            rest = args[2:]
        elif args and isinstance(args[0], str) and ":" in args[0]:
            host, _, port_text = args[0].rpartition(":")
            if not port_text.isdigit():
                raise RuntimeError(f"Parameter 'address' should be 'host:port', but actually {args[0]!r}")
            ip, port, rest = host.strip("[]"), int(port_text), args[1:]
        else:
            ip, port = kwargs.pop("ip", None), kwargs.pop("port", None)
            rest = args
        names = ["servable_name", "method_name", "version_number", "max_msg_mb_size"]
        values = dict(zip(names, rest))
        values.setdefault("version_number", version_number)
        values.setdefault("max_msg_mb_size", max_msg_mb_size)
        for key in list(kwargs):
            if key in names and key not in values:
                values[key] = kwargs.pop(key)
        if kwargs:
            raise TypeError(f"Client() got unexpected arguments {sorted(kwargs)}")
        _check("ip", ip, str)
        _check("port", port, int, 0, 65535)
        _check("servable_name", values.get("servable_name"), str)
        _check("method_name", values.get("method_name"), str)
        _check("version_number", values["version_number"], int, 0)
        _check("max_msg_mb_size", values["max_msg_mb_size"], int, 1, 512)
        self.ip, self.port = ip, port
        self.servable_name = values["servable_name"]
        self.method_name = values["method_name"]
        self.version_number = values["version_number"]
        self.timeout = default_timeout() if timeout is None else float(timeout)
        target = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        self._channel = grpc.insecure_channel(target, options=message_options(values["max_msg_mb_size"] * 2**20))
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
        code = exc.code()
        return {"error": f"gRPC error {code.name if code else '?'} calling {self.ip}:{self.port}: {exc.details()}"}

    @staticmethod
    def _parse(reply: pb.PredictReply):
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
                result.append({k: from_tensor(t, k, scalars=True) for k, t in instance.items.items()})
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
