"""The Patient module every object made for the PACS carries, from real headers as anonymisers and scanners leave
them: valid whatever the source got wrong, the same for the report and the overlay of an image."""

from __future__ import annotations

import pydicom
from pydicom.data import get_testdata_file

from appliance.delivery.patient import (
    METHOD_NOT_STATED,
    PATIENT_MODULE,
    highdicom_header,
    patient_module,
    set_patient_module,
)


def header(**values: object) -> pydicom.Dataset:
    path = get_testdata_file("CT_small.dcm")
    assert isinstance(path, str)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    for keyword, value in values.items():
        if value is None:
            del ds[keyword]
        else:
            setattr(ds, keyword, value)
    return ds


def _code(value: str, meaning: str | None) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator = value, "DCM"
    if meaning is not None:
        item.CodeMeaning = meaning
    return item


def test_identity_removed_without_a_method_gets_one_said() -> None:
    module = patient_module(header(PatientName="CQ500-CT-310", PatientID="CQ500-CT-310", PatientIdentityRemoved="YES"))
    assert (module.PatientName, module.PatientID, module.PatientIdentityRemoved) == ("CQ500-CT-310",) * 2 + ("YES",)
    assert module.DeidentificationMethod == METHOD_NOT_STATED and len(METHOD_NOT_STATED) <= 64  # LO
    assert "DeidentificationMethodCodeSequence" not in module


def test_the_source_s_method_is_kept_and_only_whole_codes_of_it() -> None:
    source = header(PatientIdentityRemoved="yes", DeidentificationMethod="Basic profile")
    source.DeidentificationMethodCodeSequence = [_code("113100", "Basic Application Confidentiality Profile")]
    module = patient_module(source)
    assert module.PatientIdentityRemoved == "YES" and module.DeidentificationMethod == "Basic profile"
    assert [c.CodeValue for c in module.DeidentificationMethodCodeSequence] == ["113100"]
    source.DeidentificationMethodCodeSequence = [_code("113100", None)]  # no meaning: not a code the PACS can show
    del source.DeidentificationMethod
    module = patient_module(source)
    assert "DeidentificationMethodCodeSequence" not in module and module.DeidentificationMethod == METHOD_NOT_STATED


def test_no_method_where_identity_is_not_removed_and_no_flag_where_it_is_not_yes_or_no() -> None:
    module = patient_module(header(PatientIdentityRemoved="NO", DeidentificationMethod="stale"))
    assert module.PatientIdentityRemoved == "NO" and "DeidentificationMethod" not in module
    module = patient_module(header(PatientIdentityRemoved="Y"))
    assert "PatientIdentityRemoved" not in module and "DeidentificationMethod" not in module


def test_type_2_attributes_are_present_and_empty_where_missing_or_invalid() -> None:
    module = patient_module(header(PatientName=None, PatientID=None, PatientBirthDate="19999999", PatientSex="male"))
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        assert keyword in module and not module[keyword].value, keyword
    module = patient_module(header(PatientBirthDate="19010203", PatientSex="f"))
    assert (module.PatientBirthDate, module.PatientSex) == ("19010203", "F")


def test_a_made_object_keeps_only_the_module_and_the_caller_s_header_is_untouched() -> None:
    source = header(PatientComments="copied by highdicom", PatientIdentityRemoved="YES")
    before = {e.tag: e.value for e in source}
    module = patient_module(source)
    given = highdicom_header(source, module)
    assert "PatientComments" not in given and given.StudyInstanceUID == source.StudyInstanceUID
    made = pydicom.Dataset(dict(source.items()))
    set_patient_module(made, module)
    assert [k for k in PATIENT_MODULE if k in made] == [k for k in PATIENT_MODULE if k in module]
    assert {e.tag: e.value for e in source} == before
