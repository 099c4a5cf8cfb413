"""The daemon's configuration: one TOML file, validated at start, with defaults that work on a laptop."""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    ValidationError,
    model_validator,
)

from appliance.domain.errors import ConfigError
from appliance.domain.settings import Section
from appliance.inference.settings import InferenceConfig
from appliance.prepare.limits import LimitsConfig

DEFAULT_PARTIAL_PATTERNS = ["*.part", "*.partial", "*.tmp", "*.temp", "*.crdownload", "*.swp", "*~"]


class WatchConfig(Section):
    dir: Path = Field(Path("var/incoming"), description="The scanner's export folder (watched recursively).")
    recursive: bool = Field(True, description="Watch sub-folders too (scanners often write one per study).")
    polling: bool = Field(
        False,
        description="Poll instead of inotify: needed for network shares (SMB/NFS) where events don't arrive.",
    )
    poll_interval_s: float = Field(1.0, gt=0, description="Polling observer's interval.")
    stable_s: float = Field(
        0.5,
        ge=0,
        description="A file without a close-write event is taken once its size and mtime stay unchanged this long.",
    )
    rescan_interval_s: float = Field(
        60.0, ge=0, description="Full rescan of the folder as a safety net for missed events; 0 disables."
    )
    ignore_patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PARTIAL_PATTERNS),
        description="Glob patterns of partial/temporary files scanners write; dotfiles are always ignored.",
    )
    after_scoring: Literal["keep", "move", "delete"] = Field(
        "move",
        description="What happens to a scored file: kept in place, moved to processed_dir, or deleted.",
    )
    processed_dir: Path = Field(Path("var/processed"), description="Where scored files go with 'move'.")
    rejected_dir: Path = Field(
        Path("var/rejected"), description="Where rejected files go, each with a '.reason.txt' beside it."
    )


class StorageConfig(Section):
    data_dir: Path = Field(Path("var/data"), description="Holds the journal (SQLite, WAL).")
    identity_dir: Path | None = Field(
        None,
        description="Where a copy of the journal's marker (its identity and sequence ceiling) is kept, apart from "
        "data_dir, so that losing data_dir's contents is refused rather than a new journal started; default: the "
        "folder <data_dir>.identity beside data_dir.",
    )
    min_free_mb: int = Field(
        256,
        ge=0,
        description="Low-water mark of free space on the data, processed and rejected folders' disks: below it "
        "new files wait in the watch folder and health says NOT_SERVING until space is freed.",
    )


class ModelConfig(Section):
    dir: Path = Field(Path("models/brain-mri-vgg16"), description="Model folder with model.toml and the ONNX file.")
    engines_dir: Path = Field(
        Path("engines"), description="Where `make engine` puts built artifacts (one sub-folder per model)."
    )


class ServerConfig(Section):
    host: str = Field(
        "127.0.0.1",
        description="gRPC listen address; 0.0.0.0 to serve the clinic's network (then TLS and tokens are required).",
    )
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one (tests).")
    metrics_host: str = Field(
        "127.0.0.1", description="Prometheus /metrics listen address: loopback unless a scraper elsewhere needs it."
    )
    metrics_port: int = Field(9108, ge=0, le=65535, description="Prometheus /metrics port; 0 disables.")
    max_message_mb: int = Field(
        64,
        gt=0,
        le=1024,
        description="Largest image accepted by Score; this times max_scores bounds what Score calls hold at once "
        "(a call without a valid token, or past its terminal's limits, is refused before its image is read).",
    )
    tls_cert: Path | None = Field(None, description="Server certificate (PEM, with its chain); `make certs` makes it.")
    tls_key: Path | None = Field(None, description="The server certificate's private key (PEM, mode 0600).")
    tls_client_ca: Path | None = Field(
        None,
        description="CA of the terminals' certificates: set, every terminal must present one (mutual TLS) and "
        "its token must be the one made for that certificate's name.",
    )
    require_token: bool | None = Field(
        None, description="Every call but health needs a terminal token; default: yes unless host is loopback."
    )
    tokens_file: Path | None = Field(
        None, description="Hashes of the terminal tokens (`appliance token`); default: <storage.data_dir>/tokens.json."
    )
    insecure: bool = Field(
        False,
        description="Lab only: serve plaintext without tokens on a non-loopback host. Logged loudly at each start.",
    )
    max_streams: int = Field(2048, ge=1, description="Open StreamResults calls, all terminals together.")
    max_streams_per_terminal: int = Field(64, ge=1, description="Open StreamResults calls per token (or per host).")
    max_scores: int = Field(8, ge=1, le=256, description="Score calls in flight, all terminals together.")
    score_rate_per_terminal: float = Field(
        20.0, gt=0, description="Score calls per second one token may make on average (bursts of twice that)."
    )

    @property
    def loopback_only(self) -> bool:
        return is_loopback(self.host)

    @property
    def tokens_required(self) -> bool:
        if self.require_token is not None:
            return self.require_token
        return not self.loopback_only and not self.insecure


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: only this box can connect."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class DicomCaller(Section):
    ae_title: str = Field(min_length=1, max_length=16, description="A scanner's (calling) AE title.")
    host: str | None = Field(None, description="Its address, where it must also match (None: any host).")


class DicomConfig(Section):
    """The DICOM receiver: a C-STORE SCP that scanners and gateways push images to, one more way in."""

    enabled: bool = Field(False, description="Listen for C-STORE and C-ECHO.")
    ae_title: str = Field("APPLIANCE", min_length=1, max_length=16, description="The called AE title it answers to.")
    host: str = Field("127.0.0.1", description="Listen address: 0.0.0.0 for the scanners on the clinic's network.")
    port: int = Field(11112, ge=0, le=65535, description="DICOM port; 0 picks a free one (tests).")
    allowed: list[DicomCaller] = Field(
        default_factory=list,
        description="Who may send: every other calling AE title (or host) is refused at association.",
    )
    max_associations: int = Field(8, ge=1, le=256, description="Associations open at once; more are refused.")
    max_associations_per_host: int = Field(
        4,
        ge=1,
        le=256,
        description="Connections open at once from one address (before and after its association is accepted).",
    )
    max_associations_per_ae: int = Field(
        4, ge=1, le=256, description="Accepted associations open at once from one calling AE title."
    )
    max_pending: int = Field(
        16,
        ge=1,
        le=1024,
        description="Connections that have not yet completed their association request, all hosts together; "
        "they never count against max_associations.",
    )
    request_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A connection must deliver its whole A-ASSOCIATE-RQ (after any TLS handshake) within this "
        "long, or it is closed.",
    )
    max_request_kb: int = Field(
        64,
        ge=4,
        le=1024,
        description="The largest A-ASSOCIATE-RQ accepted; a longer declared length is refused before it is read.",
    )
    timeout_s: float = Field(30.0, gt=0, description="ACSE, DIMSE and network timeouts.")
    tls_cert: Path | None = Field(None, description="DICOM TLS: the certificate (PEM); set with tls_key.")
    tls_key: Path | None = Field(None, description="DICOM TLS: its private key.")
    tls_client_ca: Path | None = Field(
        None, description="DICOM TLS: CA of the scanners' certificates; set, every scanner must present one."
    )

    @model_validator(mode="after")
    def _who_may_send(self) -> DicomConfig:
        if self.enabled and not self.allowed:
            raise ValueError(
                "the DICOM receiver is on but no scanner may send: list them under [[dicom.allowed]] "
                '(ae_title = "CT01", and host where it must match)'
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set dicom.tls_cert and dicom.tls_key together (DICOM TLS needs both)")
        return self


class PacsConfig(Section):
    """Where results go as DICOM: a structured report per scored DICOM image, sent through the outbox."""

    enabled: bool = Field(False, description="Send a DICOM SR of each scored DICOM image to the PACS.")
    ae_title: str = Field("PACS", min_length=1, max_length=16, description="The PACS's (called) AE title.")
    host: str = Field("127.0.0.1", description="The PACS's address.")
    port: int = Field(104, ge=1, le=65535, description="The PACS's DICOM port.")
    calling_ae_title: str = Field(
        "APPLIANCE", min_length=1, max_length=16, description="This appliance's AE title as the PACS knows it."
    )
    per_association: int = Field(32, ge=1, description="Reports sent on one association at most.")
    retry_s: float = Field(5.0, gt=0, description="First wait after a failed send; doubled each time.")
    retry_max_s: float = Field(300.0, gt=0, description="The longest wait between two tries.")
    timeout_s: float = Field(30.0, gt=0, description="ACSE, DIMSE and network timeouts.")
    tls_ca: Path | None = Field(None, description="DICOM TLS to the PACS: the CA its certificate is checked against.")
    tls_cert: Path | None = Field(None, description="DICOM TLS: this appliance's certificate, where the PACS asks.")
    tls_key: Path | None = Field(None, description="DICOM TLS: its private key.")
    manufacturer: str = Field("Imaging appliance", description="The reports' Manufacturer.")
    series_number: int = Field(9001, ge=1, description="The Series Number of the appliance's report series.")
    report_per: Literal["series", "image"] = Field(
        "series",
        description="series: per DICOM series one Enhanced SR, one Key Object Selection of its key images and a "
        "heatmap Secondary Capture per key image, once the series is complete; image: an SR (and heatmap) per scored "
        "image.",
    )
    overlays: bool = Field(
        True,
        description="Beside each report, an RGB Secondary Capture of the heatmap over the image (in series "
        "series_number + 1; uncompressed, 0.5 to 3 MB each), where the model gives heatmaps; false: reports only.",
    )

    @model_validator(mode="after")
    def _tls_whole(self) -> PacsConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set pacs.tls_cert and pacs.tls_key together")
        if self.tls_cert is not None and self.tls_ca is None:
            raise ValueError("pacs.tls_cert is set but pacs.tls_ca is not: DICOM TLS to the PACS needs its CA")
        if self.retry_max_s < self.retry_s:
            raise ValueError("pacs.retry_max_s must be at least pacs.retry_s")
        return self


class SeriesConfig(Section):
    """DICOM images assembled into their series (by Series Instance UID, in their study), as radiologists read them."""

    stable_s: float = Field(
        30.0,
        gt=0,
        le=86400,
        description="A series is complete once no new image of it has been stored for this long (Orthanc's "
        "StableAge), or at once where its header says all are in; after a restart, every open series waits this "
        "long again, so its images still queued are scored first.",
    )


class LoggingConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    json_format: bool = Field(False, description="One JSON object per line (for journald/ELK) instead of text.")


class Config(Section):
    watch: WatchConfig = Field(default_factory=WatchConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    dicom: DicomConfig = Field(default_factory=DicomConfig)
    pacs: PacsConfig = Field(default_factory=PacsConfig)
    series: SeriesConfig = Field(default_factory=SeriesConfig)

    def resolved(self, base: Path) -> Config:
        """Relative paths are taken from the config file's folder, so a unit file can point anywhere."""

        def fix(p: Path) -> Path:
            return p if p.is_absolute() else (base / p).resolve()

        return self.model_copy(
            update={
                "watch": self.watch.model_copy(
                    update={
                        "dir": fix(self.watch.dir),
                        "processed_dir": fix(self.watch.processed_dir),
                        "rejected_dir": fix(self.watch.rejected_dir),
                    }
                ),
                "storage": self.storage.model_copy(
                    update={
                        "data_dir": (data := fix(self.storage.data_dir)),
                        "identity_dir": fix(self.storage.identity_dir or data.parent / f"{data.name}.identity"),
                    }
                ),
                "model": self.model.model_copy(
                    update={"dir": fix(self.model.dir), "engines_dir": fix(self.model.engines_dir)}
                ),
                "server": self.server.model_copy(
                    update={
                        key: fix(value)
                        for key in ("tls_cert", "tls_key", "tls_client_ca", "tokens_file")
                        if (value := getattr(self.server, key)) is not None
                    }
                    | {"tokens_file": fix(self.server.tokens_file or self.storage.data_dir / "tokens.json")}
                ),
                "dicom": self.dicom.model_copy(
                    update={
                        key: fix(value)
                        for key in ("tls_cert", "tls_key", "tls_client_ca")
                        if (value := getattr(self.dicom, key)) is not None
                    }
                ),
                "pacs": self.pacs.model_copy(
                    update={
                        key: fix(value)
                        for key in ("tls_ca", "tls_cert", "tls_key")
                        if (value := getattr(self.pacs, key)) is not None
                    }
                ),
            }
        )


def load_config(path: Path | None) -> Config:
    """Read and validate the config; a problem is one ConfigError sentence naming the key."""
    if path is None:
        return Config().resolved(Path.cwd())
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"Config file {path} does not exist.") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"Config file {path} is not valid TOML: {e}.") from e
    try:
        config = Config.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ConfigError(f"{path}: {where}: {first['msg']}.") from e
    return config.resolved(path.resolve().parent)
