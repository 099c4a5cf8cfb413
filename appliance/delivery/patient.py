"""The Patient module of every object made for the PACS, taken from the source image's header one way: an image's
report and its overlay say the same of its patient, and say it validly whatever the source got wrong."""

from __future__ import annotations

import re
from datetime import datetime

import pydicom

# The Patient module's root attributes (PS3.3 C.7.1.1): what highdicom may have copied from the source, cleared
# from a made object before the module is set the one way.
PATIENT_MODULE = (
    "ReferencedPatientSequence",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "TypeOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "SourcePatientGroupIdentificationSequence",
    "GroupOfPatientsIdentificationSequence",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientBirthDateInAlternativeCalendar",
    "PatientDeathDateInAlternativeCalendar",
    "PatientAlternativeCalendar",
    "PatientSex",
    "QualityControlSubject",
    "StrainDescription",
    "StrainNomenclature",
    "StrainStockSequence",
    "StrainAdditionalInformation",
    "StrainCodeSequence",
    "GeneticModificationsSequence",
    "OtherPatientNames",
    "OtherPatientIDsSequence",
    "ReferencedPatientPhotoSequence",
    "EthnicGroupCodeSequence",
    "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence",
    "PatientBreedDescription",
    "PatientBreedCodeSequence",
    "BreedRegistrationSequence",
    "ResponsiblePerson",
    "ResponsiblePersonRole",
    "ResponsibleOrganization",
    "PatientComments",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
)
# Type 2: always present, empty where the source has none. Name and ID go as the source gives them, so the PACS
# files the objects with their image.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
_SEXES = frozenset({"M", "F", "O"})
_DATE = re.compile(r"[0-9]{8}")
# Said where the source says its identity was removed but not how (common from anonymisers): the pair is Type 1C
# once Patient Identity Removed is YES, and the flag is worth keeping.
METHOD_NOT_STATED = "Removed before receipt; the source does not say how"


def patient_module(source: pydicom.Dataset) -> pydicom.Dataset:
    """The Patient module every object made from ``source`` carries: name, ID (and its issuer), birth date and sex
    (empty where missing or not a valid value), and Patient Identity Removed with its de-identification method where
    the source says YES (the method filled in where it says none)."""
    module = pydicom.Dataset()
    module.PatientName = _text(source, "PatientName")
    module.PatientID = _text(source, "PatientID")
    if _text(source, "IssuerOfPatientID"):
        module.IssuerOfPatientID = _text(source, "IssuerOfPatientID")
    birth = _text(source, "PatientBirthDate")
    module.PatientBirthDate = birth if _is_date(birth) else None
    sex = _text(source, "PatientSex").upper()
    module.PatientSex = sex if sex in _SEXES else None
    removed = _text(source, "PatientIdentityRemoved").upper()
    if removed in ("YES", "NO"):
        module.PatientIdentityRemoved = removed
    if removed == "YES":
        methods = [m for m in _values(source.get("DeidentificationMethod")) if m]
        codes = [item for item in source.get("DeidentificationMethodCodeSequence") or [] if _is_code(item)]
        if methods:
            module.DeidentificationMethod = methods
        if codes:
            module.DeidentificationMethodCodeSequence = codes
        if not methods and not codes:
            module.DeidentificationMethod = METHOD_NOT_STATED
    return module


def highdicom_header(source: pydicom.Dataset, module: pydicom.Dataset) -> pydicom.Dataset:
    """``source`` as highdicom is given it: its own element dict (Dataset(source) would share the source's), with
    ``module`` in place of the source's Patient module, so highdicom refuses no value the source got wrong."""
    header = pydicom.Dataset(dict(source.items()))
    header.file_meta = getattr(source, "file_meta", pydicom.dataset.FileMetaDataset())
    for keyword in PATIENT_MODULE:
        if keyword in header:
            del header[keyword]
    header.update(module)
    return header


def set_patient_module(made: pydicom.Dataset, module: pydicom.Dataset) -> None:
    """``made`` carries ``module`` as its Patient module, and nothing else of it that highdicom copied."""
    for keyword in PATIENT_MODULE:
        if keyword in made:
            del made[keyword]
    made.update(module)


def _text(source: pydicom.Dataset, keyword: str) -> str:
    value = source.get(keyword)
    return "" if value is None else str(value).strip()


def _values(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str | bytes):
        return [str(value).strip()[:64]]
    try:
        return [str(v).strip()[:64] for v in value]  # type: ignore[attr-defined]
    except TypeError:
        return [str(value).strip()[:64]]


def _is_date(text: str) -> bool:
    if not _DATE.fullmatch(text):
        return False
    try:
        datetime.strptime(text, "%Y%m%d")
    except ValueError:
        return False
    return True


def _is_code(item: pydicom.Dataset) -> bool:
    """A code the standard's Code Sequence Macro accepts: a value, its scheme and its meaning."""
    has_value = any(str(item.get(k, "") or "").strip() for k in ("CodeValue", "LongCodeValue", "URNCodeValue"))
    return has_value and all(str(item.get(k, "") or "").strip() for k in ("CodingSchemeDesignator", "CodeMeaning"))
