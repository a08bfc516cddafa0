"""The served model over the network: a TF Serving client with the interface ``analyze`` expects.

``ceriakeras analyze --server URL`` runs the network on a TF Serving server; everything else
(reading frames, resampling to the model's pixel size, column extraction, tables, overlays) is
:func:`ceriakeras.analysis.run.analyze` itself, given a :class:`RemoteModel` in place of the
local model, so its ``columns.csv`` equals the local model's. The model's needs (pixel size,
``max_height``, label radius) are read from the same SavedModel's ``assets/ceriakeras.json`` on
this machine (``--model``), and each request names that version, so the server answers with the
graph those assets describe.

``--server http://HOST:8501`` speaks TF Serving's REST API; ``--server grpc://HOST:8500`` its
gRPC ``PredictionService`` (needs ``pip install tensorflow-serving-api``). A server that is down,
or answers an error, is a one-line :class:`ServingError`.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import numpy as np

from ..config import ModelError
from .served import model_version

SIGNATURE = "serving_default"
"""The serving signature every ceriakeras SavedModel has (see docs/design.md)."""


class ServingError(ModelError):
    """The model server cannot be reached or answered with an error."""


class RemoteModel:
    """A model served by TF Serving's REST API, with the interface ``analyze`` expects.

    Parameters
    ----------
    url : str
        Server root, e.g. ``http://localhost:8501``.
    model_name : str
        Name the server knows the model by.
    info : dict
        The model's ``ceriakeras.json`` (``pixel_size_A``, ``max_height``, ``label_radius_A``, …).
    version : int, optional
        Model version to ask for (the server's latest if None).
    timeout_s : float
        Seconds to wait for each answer.
    """

    def __init__(self, url: str, model_name: str, info: dict, *, version: int | None = None,
                 timeout_s: float = 120.0):
        self.url = url.rstrip("/")
        self.model_name = model_name
        self.info = info
        self.version = version
        self.timeout_s = timeout_s

    @property
    def endpoint(self) -> str:
        version = "" if self.version is None else f"/versions/{self.version}"
        return f"{self.url}/v1/models/{self.model_name}{version}:predict"

    def check(self) -> None:
        """Ask the server for the model's status (``GET /v1/models/NAME[/versions/N]``).

        Raises
        ------
        ServingError
            If the server is down, does not know the model or version, or it is not AVAILABLE.
        """
        status_url = self.endpoint.removesuffix(":predict")
        answer = self._call(urllib.request.Request(status_url, method="GET"), status_url)
        states = [s.get("state") for s in answer.get("model_version_status", [])]
        if "AVAILABLE" not in states:
            raise ServingError(f"{status_url} is not available (state {', '.join(map(str, states)) or 'unknown'}): "
                               "wait for the server to load it, or check --model-name and the --model version")

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the served ``serving_default`` on a batch of frames.

        Parameters
        ----------
        images : (B, H, W) float
            Raw counts (or any linear intensity) at the model's pixel size.

        Returns
        -------
        probabilities : (B, H, W, C) float32
        height : (B, H, W) int32
        """
        images = np.asarray(images, dtype=np.float32)
        body = {"signature_name": SIGNATURE,
                "instances": [{"image": frame[..., None].tolist()} for frame in images]}
        answer = self._post(json.dumps(body).encode())
        try:
            rows = answer["predictions"]
            probabilities = np.asarray([r["probabilities"] for r in rows], dtype=np.float32)
            height = np.asarray([r["height"] for r in rows], dtype=np.int32)
        except (KeyError, TypeError, ValueError) as err:
            raise ServingError(f"{self.endpoint} answered without the ceriakeras outputs "
                               f"(probabilities, height): {err!r}") from None
        expected = images.shape + (int(self.info["max_height"]) + 1,)
        if probabilities.shape != expected or height.shape != images.shape:
            raise ServingError(f"{self.endpoint} answered probabilities {probabilities.shape}, height "
                               f"{height.shape} for frames {images.shape}: is --model the served model?")
        return probabilities, height

    def _post(self, data: bytes) -> dict:
        request = urllib.request.Request(self.endpoint, data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
        return self._call(request, self.endpoint)

    def _call(self, request: urllib.request.Request, where: str) -> dict:
        """Send ``request``; its JSON answer, or a one-line ServingError."""
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                text = response.read()
        except urllib.error.HTTPError as err:
            raise ServingError(f"{where} answered HTTP {err.code}: {_error_message(err)}") from None
        except urllib.error.URLError as err:
            raise ServingError(f"cannot reach TF Serving at {self.url} ({err.reason}): is the server "
                               "running and the --server right?") from None
        except (socket.timeout, TimeoutError):
            raise ServingError(f"{where} did not answer within {self.timeout_s:g} s: "
                               "raise --server-timeout or send smaller frames") from None
        try:
            return json.loads(text)
        except ValueError:
            raise ServingError(f"{where} answered with something that is not JSON") from None


def _error_message(err: urllib.error.HTTPError) -> str:
    """TF Serving's ``{"error": …}`` body, or the HTTP reason, on one line."""
    try:
        message = json.loads(err.read()).get("error", err.reason)
    except (ValueError, AttributeError, OSError):
        message = err.reason
    return " ".join(str(message).split())


class GrpcModel(RemoteModel):
    """The same model over TF Serving's gRPC ``PredictionService`` (needs ``tensorflow-serving-api``)."""

    def __init__(self, target: str, model_name: str, info: dict, *, version: int | None = None,
                 timeout_s: float = 120.0):
        super().__init__(f"grpc://{target}", model_name, info, version=version, timeout_s=timeout_s)
        try:
            import grpc
            from tensorflow_serving.apis import prediction_service_pb2_grpc
        except ImportError:
            raise ServingError("a grpc:// --server needs the tensorflow-serving-api package "
                               "(pip install tensorflow-serving-api); or use http:// for REST") from None
        # Probability maps exceed gRPC's default 4 MB message limit.
        channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", -1),
                                                         ("grpc.max_receive_message_length", -1)])
        self._grpc = grpc
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

    @property
    def endpoint(self) -> str:
        return f"{self.url} ({self.model_name})"

    def check(self) -> None:
        """Nothing to check up front: the first Predict call reports a down server or a bad name."""

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        images = np.asarray(images, dtype=np.float32)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = SIGNATURE
        if self.version is not None:
            request.model_spec.version.value = self.version
        request.inputs["image"].CopyFrom(tf.make_tensor_proto(images[..., None]))
        try:
            response = self._stub.Predict(request, timeout=self.timeout_s)
        except self._grpc.RpcError as err:
            raise ServingError(f"{self.endpoint} answered {err.code().name}: "
                               f"{' '.join(str(err.details()).split())}") from None
        return (tf.make_ndarray(response.outputs["probabilities"]).astype(np.float32),
                tf.make_ndarray(response.outputs["height"]).astype(np.int32))


def remote_model(server: str, model=None, *, model_name: str | None = None,
                 timeout_s: float = 120.0) -> RemoteModel:
    """The model served at ``server``, described by its local copy ``model``, checked available.

    Parameters
    ----------
    server : str
        ``http://HOST:PORT`` (REST) or ``grpc://HOST:PORT`` (gRPC).
    model : path or None
        Local copy of the served SavedModel (``saved_models/NAME`` or a version folder; None =
        the shipped model): its assets give the pixel size and heights, its version folder the
        version asked for.
    model_name : str, optional
        Name the server serves the model under; default: the model's folder name (``NAME``).
    timeout_s : float
        Seconds to wait for each answer.

    Raises
    ------
    ServingError
        The server is down, does not know the model or version, or answers an error.
    """
    version_dir, info = model_version(model)
    name = model_name or version_dir.parent.name
    version = int(version_dir.name) if version_dir.name.isdigit() else None
    if server.startswith("grpc://"):
        remote: RemoteModel = GrpcModel(server.removeprefix("grpc://"), name, info,
                                        version=version, timeout_s=timeout_s)
    elif server.startswith(("http://", "https://")):
        remote = RemoteModel(server, name, info, version=version, timeout_s=timeout_s)
    else:
        raise ServingError(f"--server {server} must start with http:// (REST) or grpc:// (gRPC), "
                           "e.g. http://localhost:8501")
    remote.check()
    return remote
