"""The one exception tree: each error has a stable machine-readable code and a default sentence."""

from __future__ import annotations

from appliance.domain.result import ImageIds


class ApplianceError(Exception):
    """Base of every error the appliance raises on purpose.

    ``code`` is stable and goes into results and logs; ``message`` is a sentence for a person.
    Messages never carry patient data (names, IDs, birth dates).
    """

    code = "internal_error"
    default_message = "An internal error occurred."

    def __init__(self, message: str | None = None) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)


# --- configuration and start-up -------------------------------------------------------------


class ConfigError(ApplianceError):
    code = "config_invalid"
    default_message = "The configuration is invalid."


class JournalDamaged(ConfigError):
    """The journal is missing, truncated, malformed or another one than the marker beside it names.
    Restarting cannot fix it (exit 2 stops systemd's restarts); `appliance journal recover` does."""

    code = "journal_damaged"
    default_message = (
        "The journal is damaged; run `appliance journal recover --config <the daemon's config>` to set it aside "
        "and salvage what can be read."
    )


class ManifestError(ApplianceError):
    code = "manifest_invalid"
    default_message = "The model manifest is invalid."


class ModelMismatchError(ManifestError):
    code = "model_mismatch"
    default_message = "The ONNX model does not match its manifest."


class ArtifactRefused(ModelMismatchError):
    code = "artifact_refused"
    default_message = "The built artifact failed its load-time self-check; run `make engine`."


class ModelMissingError(ManifestError):
    code = "model_missing"
    default_message = "The model file is missing; run `make model` to fetch it."


# --- per-input rejections: each becomes a rejected result, never a crash --------------------


class InputRejected(ApplianceError):
    """An input that cannot be scored. The daemon records it, moves it aside and goes on. ``ids`` are the
    DICOM identifiers its header gave, where it was read before the input was refused (so the rejected result
    names its study, series and instance); they travel with the error from a decode worker."""

    code = "input_rejected"
    default_message = "The input could not be scored."
    ids: ImageIds | None = None


class EmptyFile(InputRejected):
    code = "empty_file"
    default_message = "The file is empty (0 bytes)."


class UnsupportedFormat(InputRejected):
    code = "unsupported_format"
    default_message = "The file is neither DICOM nor a PNG, JPEG or TIFF image."


class CorruptImage(InputRejected):
    code = "corrupt_image"
    default_message = "The image data is corrupt or truncated and could not be decoded."


class CorruptDicom(InputRejected):
    code = "corrupt_dicom"
    default_message = "The DICOM file is corrupt or truncated and could not be parsed."


class NoPixelData(InputRejected):
    code = "no_pixel_data"
    default_message = "The DICOM object holds no image (no Pixel Data), e.g. a report or RT plan."


class UnsupportedTransferSyntax(InputRejected):
    code = "unsupported_transfer_syntax"
    default_message = "No installed decoder handles this DICOM transfer syntax."


class UnsupportedPixelFormat(InputRejected):
    code = "unsupported_pixel_format"
    default_message = "The image's pixel format (photometric interpretation, bit depth or channels) is not supported."


class ImageTooLarge(InputRejected):
    code = "image_too_large"
    default_message = "The image exceeds the configured pixel limit."


class MultiFrameRejected(InputRejected):
    code = "multiframe_rejected"
    default_message = "The input has several frames and the configuration rejects multi-frame inputs."


class InflatesTooLarge(InputRejected):
    code = "inflates_too_large"
    default_message = (
        "The Deflated DICOM data set inflates far beyond the pixel data its header declares; it is refused as a "
        "decompression bomb."
    )


class ExcessPixelData(InputRejected):
    code = "excess_pixel_data"
    default_message = "The DICOM Pixel Data holds more frames than its header declares (Number of Frames)."


class CodestreamMismatch(InputRejected):
    """A compressed frame whose own header (JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ, RLE segment count) gives
    other sizes than the DICOM header's: refused before it is decoded, since decoders size their output by it."""

    code = "codestream_mismatch"
    default_message = (
        "A compressed frame's own header gives other image sizes than the DICOM header (Rows, Columns, Samples per "
        "Pixel, Bits Allocated); it is refused before decoding."
    )


class DecodeOutOfMemory(InputRejected):
    code = "decode_out_of_memory"
    default_message = "Decoding this file ran out of the memory a decode worker may use (limits.worker_memory_mb)."


class DecodeTimeout(InputRejected):
    code = "decode_timeout"
    default_message = "Decoding this file took longer than the configured limit (limits.decode_timeout_s)."


class DecoderCrashed(InputRejected):
    code = "decoder_crashed"
    default_message = "Decoding this file crashed a worker process each time it was tried; it is set aside."


class FileVanished(InputRejected):
    code = "file_vanished"
    default_message = "The file disappeared before it could be read."


class FileRewritten(InputRejected):
    code = "file_changed"
    default_message = (
        "The file was rewritten after it was taken; it is left in the folder, where its new content is taken as a "
        "new input."
    )


class InputTooLarge(InputRejected):
    code = "file_too_large"
    default_message = "The file exceeds the configured size limit."


class RepeatedCrash(InputRejected):
    code = "repeated_crash"
    default_message = (
        "Scoring this input was cut short by several daemon restarts in a row; it is set aside so the rest can go on."
    )


class InferenceFailed(InputRejected):
    code = "inference_failed"
    default_message = "The backend failed to score this input."


class StorageFull(ApplianceError):
    """A result or an input could not be written for want of space; it is retried once space returns."""

    code = "storage_full"
    default_message = "The appliance's disk is full; the result is stored and streamed once space is freed."


# --- inference backends ---------------------------------------------------------------------


class BackendError(ApplianceError):
    code = "backend_error"
    default_message = "The inference backend failed."


class BackendUnavailable(BackendError):
    code = "backend_unavailable"
    default_message = "The requested inference backend is not available on this host."


# A remote inference server's gRPC status, as the appliance's codes (appliance/inference/backends/triton.py).
class ServerUnavailable(BackendUnavailable):
    code = "server_unavailable"  # UNAVAILABLE: not reachable, or shutting down
    default_message = "No inference server could be reached."


class ServerTimeout(BackendError):
    code = "server_timeout"  # DEADLINE_EXCEEDED
    default_message = "The inference server did not answer in time."


class ServerModelMissing(BackendError):
    code = "server_model_missing"  # NOT_FOUND: the model is not loaded there
    default_message = "The inference server does not serve the model."


class ServerRefusedRequest(BackendError):
    code = "server_invalid_argument"  # INVALID_ARGUMENT: the request itself was refused
    default_message = "The inference server refused the request."


# --- ways out -------------------------------------------------------------------------------


class ReportError(ApplianceError):
    """A result that cannot be written as a DICOM structured report: not a scored result, or a source
    header without the identifiers a report must reference."""

    code = "report_failed"
    default_message = "The result could not be written as a DICOM structured report."
