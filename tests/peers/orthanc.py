"""A real Orthanc for the tests (the PACS the outbox sends to, or a sender to the receiver), on its own ports."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self

import pytest

from tests.peers import dies_with_parent, executable, free_port, require
from tests.waiting import eventually

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0  # a clean stop takes about 4.5 s: Orthanc waits on its jobs engine and flushing threads
REST_TIMEOUT_S = 30.0


class OrthancError(RuntimeError):
    """Orthanc did not start or stop, or its REST API answered an error."""


class RemoteAe(NamedTuple):
    """A DICOM node in Orthanc's `DicomModalities`: it takes associations only from these, and sends to them."""

    ae_title: str
    host: str = "127.0.0.1"
    port: int = 104


class Code(NamedTuple):
    """A coded concept as Orthanc shows it (a long or URN code value in `value` too)."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class ContentItem:
    """One SR content item, taken out of its tree (`Orthanc.content_items`), to check codes and values by name."""

    depth: int
    relationship: str | None
    value_type: str
    name: Code | None
    # CODE: a Code; NUM: the number (None when it has none); IMAGE and COMPOSITE: the referenced SOP Instance
    # UID; TEXT, UIDREF, DATE, TIME, DATETIME, PNAME: the text; CONTAINER and the rest: None.
    value: Code | float | str | None
    unit: Code | None = None


class Orthanc:
    """Orthanc in the foreground with a temporary JSON config: free DICOM and HTTP ports on 127.0.0.1 (it binds
    0.0.0.0; HTTP refuses remote clients), storage under `root`, no plugins, no auth, the called AE title checked,
    and C-STORE and C-ECHO taken only from the AEs in `modalities`.

    `with Orthanc(root, ...) as pacs:` starts it and kills it at the end; `Orthanc.fixture(...)` makes a pytest
    fixture. `stop()`/`kill()` then `start()` restart it on the same ports and storage, keeping what it stored.
    """

    def __init__(
        self,
        root: Path,
        *,
        ae_title: str = "ORTHANC",
        modalities: Mapping[str, RemoteAe] | None = None,
        options: Mapping[str, Any] | None = None,
        verbose: bool = True,
    ) -> None:
        self.root = root
        self.ae_title = ae_title
        self.modalities = dict(modalities or {})
        self.options = dict(options or {})  # more of Orthanc's configuration keys, over the defaults below
        self.verbose = verbose
        self.dicom_port = 0
        self.http_port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def fixture(
        cls,
        *,
        ae_title: str = "ORTHANC",
        modalities: Mapping[str, RemoteAe] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> Callable[..., Iterator[Orthanc]]:
        """A pytest fixture (named after the module attribute it is assigned to) yielding a started Orthanc in the
        test's tmp_path, skipped with the install line where Orthanc is missing:
        `pacs = Orthanc.fixture(ae_title="PACS", modalities={"appliance": RemoteAe("APPLIANCE", port=11112)})`."""

        @pytest.fixture
        def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
            require("Orthanc")
            with cls(tmp_path / "orthanc", ae_title=ae_title, modalities=modalities, options=options) as peer:
                yield peer

        return orthanc

    # --- the process

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    @property
    def config_path(self) -> Path:
        return self.root / "orthanc.json"

    @property
    def log_path(self) -> Path:
        """Orthanc's log, all its runs appended."""
        return self.root / "orthanc.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    def config(self) -> dict[str, Any]:
        """The configuration it starts with (the file `config_path` holds)."""
        return {
            "Name": f"test-{self.ae_title}",
            "StorageDirectory": str(self.storage),
            "IndexDirectory": str(self.storage),
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpDescribeErrors": True,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            # Not "DicomCheckCalledAetTitle": Orthanc ignores unknown keys silently and would take any called AE.
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowEcho": False,
            "DicomAlwaysAllowStore": False,
            "DicomCheckModalityHost": False,
            "DicomModalities": {name: list(ae) for name, ae in self.modalities.items()},
            "OverwriteInstances": False,  # its default, spelt out: a re-sent instance is kept once
            "SaveJobs": False,
            "StableAge": 1,
            **self.options,
        }

    def start(self, timeout: float = START_TIMEOUT_S) -> Self:
        """Start it and return once its REST API answers. The first start picks the ports; later ones reuse them."""
        if self.running:
            raise OrthancError("Orthanc is already running")
        fresh = self.dicom_port == 0
        self.storage.mkdir(parents=True, exist_ok=True)
        for attempt in range(3 if fresh else 1):
            if fresh:
                self.dicom_port, self.http_port = free_port(), free_port()
                while self.http_port == self.dicom_port:
                    self.http_port = free_port()
            self.config_path.write_text(json.dumps(self.config(), indent=2))
            self._spawn()
            try:
                self._wait_ready(timeout)
                return self
            except _ExitedEarly:
                # A port picked free may be taken by the time Orthanc binds it: pick others.
                if not fresh or attempt == 2:
                    raise OrthancError(f"Orthanc exited on start: {self.log_tail()}") from None
        raise AssertionError("unreachable")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """A clean stop: SIGTERM, then wait until it has exited."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise OrthancError(f"Orthanc did not stop within {timeout:.0f} s of SIGTERM; killed") from None

    def kill(self) -> None:
        """SIGKILL, as a crash or a pulled plug: what it had acknowledged is still on disk."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Killed, not stopped: its storage is the test's temporary folder, and a clean stop costs ~4.5 s.
        self.kill()

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _spawn(self) -> None:
        command = [
            *dies_with_parent(),
            str(executable("Orthanc")),
            *(["--verbose"] if self.verbose else []),
            str(self.config_path),
        ]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def _wait_ready(self, timeout: float) -> None:
        def answers() -> bool:
            if self._proc is None or self._proc.poll() is not None:
                raise _ExitedEarly
            self.get("/system")
            return True

        try:
            eventually(answers, "Orthanc's REST API", timeout=timeout, every=0.02, ignoring=(OSError, OrthancError))
        except AssertionError:
            self.kill()
            raise OrthancError(f"Orthanc's REST API did not answer within {timeout:.0f} s: {self.log_tail()}") from None

    # --- REST (standard library only)

    def get(self, path: str) -> Any:
        return self._call("GET", path, None)

    def get_bytes(self, path: str) -> bytes:
        """A file as Orthanc serves it (`/instances/<id>/file`): the bytes, not JSON."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=REST_TIMEOUT_S) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as e:
            raise OrthancError(f"GET {path}: HTTP {e.code}") from e

    def post(self, path: str, body: bytes | str | object) -> Any:
        return self._call("POST", path, body)

    def put(self, path: str, body: bytes | str | object) -> Any:
        return self._call("PUT", path, body)

    def _call(self, method: str, path: str, body: bytes | str | object) -> Any:
        if body is None or isinstance(body, bytes):
            data = body
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=REST_TIMEOUT_S) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            raise OrthancError(f"{method} {path}: HTTP {e.code} {e.read().decode(errors='replace')}") from e
        return json.loads(raw) if raw else None

    # --- what it holds

    def instances(self) -> list[str]:
        """Orthanc's ids of every instance it holds."""
        return list(self.get("/instances"))

    def find_sop(self, sop_instance_uid: str) -> str | None:
        """Orthanc's id of the instance with this SOP Instance UID, or None."""
        found = self.post("/tools/lookup", sop_instance_uid)
        return next((hit["ID"] for hit in found if hit["Type"] == "Instance"), None)

    def tags(self, orthanc_id: str) -> dict[str, Any]:
        """The instance's tags by keyword (Orthanc's simplified tags): sequences are lists of dicts, values text."""
        return dict(self.get(f"/instances/{orthanc_id}/simplified-tags"))

    def content(self, orthanc_id: str) -> list[dict[str, Any]]:
        """An SR's ContentSequence, as simplified tags (the tree as stored)."""
        return list(self.tags(orthanc_id).get("ContentSequence", []))

    def content_items(self, orthanc_id: str) -> list[ContentItem]:
        """An SR's content items, depth first, each with its concept name and value decoded."""
        return flatten(self.content(orthanc_id))

    def wait_for_instances(self, count: int, timeout: float = 30.0) -> list[str]:
        """Poll until it holds at least `count` instances; their ids. AssertionError past the deadline."""
        return eventually(
            self.instances, f"Orthanc holding {count} instances", until=lambda held: len(held) >= count, timeout=timeout
        )

    # --- Orthanc as a DICOM client (a sender to the receiver)

    def add_modality(self, name: str, ae: RemoteAe) -> None:
        """Know one more node, e.g. the appliance once its port is known: live, and in the config for restarts."""
        self.modalities[name] = ae
        if self.running:
            self.put(f"/modalities/{name}", {"AET": ae.ae_title, "Host": ae.host, "Port": ae.port})
        self.config_path.write_text(json.dumps(self.config(), indent=2))

    def echo(self, modality: str) -> bool:
        """C-ECHO from Orthanc to a node in `modalities`: whether it answered."""
        try:
            self.post(f"/modalities/{modality}/echo", {})
        except OrthancError:
            return False
        return True

    def send(self, modality: str, orthanc_ids: list[str]) -> dict[str, Any]:
        """C-STORE of these instances from Orthanc to a node in `modalities`, on one association; an
        OrthancError when the node refuses (the message has Orthanc's reason)."""
        return dict(self.post(f"/modalities/{modality}/store", orthanc_ids))

    def upload(self, path: Path) -> str:
        """Put a file in Orthanc over REST (no DICOM): its id."""
        return str(self.post("/instances", path.read_bytes())["ID"])


def flatten(content: list[dict[str, Any]], depth: int = 0) -> list[ContentItem]:
    """SR content items (simplified tags) depth first, each with its concept name and value decoded."""
    items: list[ContentItem] = []
    for item in content:
        value_type = str(item.get("ValueType", ""))
        value: Code | float | str | None = None
        unit: Code | None = None
        if value_type == "CODE":
            value = _code(item.get("ConceptCodeSequence"))
        elif value_type == "NUM":
            measured = item.get("MeasuredValueSequence") or [{}]
            number = measured[0].get("NumericValue")
            value = float(str(number).split("\\")[0]) if number not in (None, "") else None
            unit = _code(measured[0].get("MeasurementUnitsCodeSequence"))
        elif value_type in ("IMAGE", "COMPOSITE", "WAVEFORM"):
            referenced = item.get("ReferencedSOPSequence") or [{}]
            value = referenced[0].get("ReferencedSOPInstanceUID")
        else:
            key = {
                "TEXT": "TextValue",
                "UIDREF": "UID",
                "DATE": "Date",
                "TIME": "Time",
                "DATETIME": "DateTime",
                "PNAME": "PersonName",
            }.get(value_type)
            value = item.get(key) if key else None
        items.append(
            ContentItem(
                depth=depth,
                relationship=item.get("RelationshipType"),
                value_type=value_type,
                name=_code(item.get("ConceptNameCodeSequence")),
                value=value,
                unit=unit,
            )
        )
        items.extend(flatten(item.get("ContentSequence", []), depth + 1))
    return items


def _code(sequence: list[dict[str, Any]] | None) -> Code | None:
    if not sequence:
        return None
    code = sequence[0]
    value = code.get("CodeValue") or code.get("LongCodeValue") or code.get("URNCodeValue") or ""
    return Code(str(value), str(code.get("CodingSchemeDesignator", "")), str(code.get("CodeMeaning", "")))


class _ExitedEarly(Exception):
    pass
