"""Deterministic synthetic MIMIC-like notes in the NOTEEVENTS layout, for demos and tests.

    python -m data_prep.synthetic_notes --output=FILE.csv [--num_notes=100] [--seed=12345]

MIMIC text may not be shared (data use agreement) and no public corpus contains MIMIC's `[**...**]` de-identification
placeholders, its `Admission Date: ... Discharge Date: ...` openings or its `____` rules, yet those are exactly what
the section and sentence rules must handle. This generator writes made-up notes with that structure, from phrase
lists in this file only (no external data, no real patients), byte-identical for the same --num_notes and --seed.

Every file (--num_notes >= MIN_NOTES) contains, at fixed rows: a discharge summary with two placeholders on one line
(the placeholder-regex quirk), an ISERROR=1 row, an empty note, a whitespace-only note and a nursing note with one
invalid UTF-8 byte (a Latin-1 degree sign). Some discharge summaries carry a `3 days of ...` line after a numbered
list, which trips the original section splitter's bug 1. Categories: Discharge summary, Radiology, Nursing,
Nursing/other, ECG, `Physician ` and `Respiratory ` (MIMIC-III's trailing spaces kept).
"""

from __future__ import annotations

import random
from typing import Sequence

from absl import flags

from clinical_bert_jax.errors import UserError, run_absl
from clinical_bert_jax.fileio import atomic_write

COLUMNS = (
  "ROW_ID",
  "SUBJECT_ID",
  "HADM_ID",
  "CHARTDATE",
  "CHARTTIME",
  "STORETIME",
  "CATEGORY",
  "DESCRIPTION",
  "CGID",
  "ISERROR",
  "TEXT",
)
MIN_NOTES = 8
# Rows (0-based) that always hold the special cases.
ISERROR_ROW, EMPTY_ROW, WHITESPACE_ROW, INVALID_UTF8_ROW = 2, 3, 5, 4
# Stands for the raw byte 0xB0 (Latin-1 "°"), invalid in UTF-8; swapped in after encoding.
_INVALID_BYTE_MARK = "\ue000"
_INVALID_BYTE = b"\xb0"

_SURNAMES = ("Known lastname", "Last Name (NamePattern1)", "Last Name (STitle)", "Name (NI)")
_FIRST_NAMES = ("First Name4 (NamePattern1)", "First Name8 (NamePattern2)", "First Name3 (LF)")
_HOSPITALS = ("Hospital1 18", "Hospital 1474", "Hospital3 2558", "Hospital6 33")
_PROBLEMS = (
  ("congestive heart failure", "CHF exacerbation", "shortness of breath", "furosemide 80 mg IV"),
  ("community acquired pneumonia", "pneumonia", "fever and cough", "ceftriaxone 1 g IV"),
  ("upper GI bleed", "GI bleed", "melena", "pantoprazole 40 mg IV b.i.d."),
  ("COPD exacerbation", "COPD", "wheezing", "prednisone 40 mg p.o. daily"),
  ("urosepsis", "urinary tract infection", "confusion", "cefepime 2 g IV q.12h."),
  ("atrial fibrillation with RVR", "AFib", "palpitations", "diltiazem 10 mg IV"),
)
_HISTORY = (
  "Hypertension",
  "Diabetes mellitus type 2",
  "Hyperlipidemia",
  "Chronic kidney disease, baseline Cr 1.4",
  "Coronary artery disease s/p CABG",
  "Atrial fibrillation on warfarin",
  "Hypothyroidism",
  "Gout",
)
_MEDICATIONS = (
  "Aspirin 81 mg PO DAILY",
  "Metoprolol succinate 50 mg PO DAILY",
  "Lisinopril 10 mg PO DAILY",
  "Atorvastatin 40 mg PO QHS",
  "Furosemide 40 mg PO DAILY",
  "Levothyroxine 75 mcg PO DAILY",
  "Warfarin 5 mg PO QHS",
  "Metformin 500 mg PO b.i.d.",
  "Omeprazole 20 mg PO DAILY",
)
_SERVICES = ("MEDICINE", "CARDIOLOGY", "SURGERY", "NEUROLOGY")
_RADIOLOGY_EXAMS = (
  ("CHEST (PORTABLE AP)", "CHEST"),
  ("CT HEAD W/O CONTRAST", "HEAD"),
  ("RENAL U.S.", "KIDNEYS"),
  ("CT ABDOMEN W/CONTRAST", "ABDOMEN"),
)
_FINDINGS = {
  "CHEST": (
    "There is mild pulmonary vascular congestion.",
    "Small bilateral pleural effusions are present.",
    "The cardiac silhouette is mildly enlarged.",
    "There is no pneumothorax.",
  ),
  "HEAD": (
    "There is no intracranial hemorrhage.",
    "The ventricles and sulci are normal in size.",
    "There is no mass effect or shift of midline structures.",
    "The visualized sinuses are clear.",
  ),
  "KIDNEYS": (
    "The right kidney measures 10.5 cm.",
    "The left kidney measures 11.2 cm.",
    "There is no hydronephrosis.",
    "The bladder is decompressed around a Foley catheter.",
  ),
  "ABDOMEN": (
    "The liver is normal in size.",
    "There is no free fluid.",
    "The appendix is normal.",
    "There is mild diverticulosis without diverticulitis.",
  ),
}
_ECG_FINDINGS = (
  "Sinus rhythm.",
  "Sinus tachycardia.",
  "Atrial fibrillation with rapid ventricular response.",
  "Left axis deviation.",
  "Left ventricular hypertrophy.",
  "Nonspecific ST-T wave changes.",
  "Poor R wave progression.",
  "Borderline first degree A-V block.",
)


class _Writer:
  """Builds one note's fields from a shared random stream, so the whole file depends only on the seed."""

  def __init__(self, rng: random.Random) -> None:
    self.rng = rng

  def date(self, year: int = 2150) -> str:
    return f"[**{year}-{self.rng.randint(1, 12)}-{self.rng.randint(1, 28)}**]"

  def name(self) -> str:
    return f"[**{self.rng.choice(_SURNAMES)} {self.rng.randint(100, 9999)}**]"

  def doctor(self) -> str:
    return (
      f"[**{self.rng.choice(_FIRST_NAMES)} {self.rng.randint(10, 999)}**] "
      f"[**{self.rng.choice(_SURNAMES)} {self.rng.randint(100, 9999)}**]"
    )

  def hospital(self) -> str:
    return f"[**{self.rng.choice(_HOSPITALS)}**]"

  def vitals(self) -> str:
    r = self.rng
    return (
      f"T {r.randint(970, 1022) / 10} HR {r.randint(55, 125)} BP {r.randint(95, 175)}/{r.randint(50, 95)} "
      f"RR {r.randint(12, 28)} O2 sat {r.randint(88, 100)}% on {r.choice(('RA', '2L NC', '4L NC'))}"
    )

  def discharge_summary(self, quirk_line: bool, list_bug: bool) -> str:
    r = self.rng
    problem, short, symptom, treatment = r.choice(_PROBLEMS)
    age = r.randint(45, 89)
    sex = r.choice(("M", "F"))
    man, pronoun, title = ("man", "He", "Mr.") if sex == "M" else ("woman", "She", "Ms.")
    history = r.sample(_HISTORY, r.randint(2, 5))
    meds = r.sample(_MEDICATIONS, r.randint(2, 5))
    lines = [
      f"Admission Date:  {self.date()}              Discharge Date:   {self.date()}",
      "",
      f"Date of Birth:  {self.date(r.randint(2060, 2100))}             Sex:   {sex}",
      "",
      f"Service: {r.choice(_SERVICES)}",
      "",
      "Allergies:",
      r.choice(("Patient recorded as having No Known Allergies to Drugs", "Penicillins / Sulfa (Sulfonamides)")),
      "",
      f"Attending:{self.doctor()}",
      "Chief Complaint:",
      symptom,
      "",
      "Major Surgical or Invasive Procedure:",
      r.choice(("None", "Upper endoscopy", "Central line placement")),
      "",
      "History of Present Illness:",
      f"{title} {self.name()} is a {age} yo {sex} with {', '.join(h.split(',')[0] for h in history)} who "
      f"presents with {r.randint(2, 7)} days of {symptom}.",
    ]
    if quirk_line:  # one match of the placeholder regex spans both placeholders and the ". " between them
      lines.append(f"{pronoun} was transferred from {self.hospital()}. Admitted on {self.date()} for further care.")
    lines += [
      f"{pronoun} was seen by Dr. {self.name()} and started on {treatment} without improvement. In the ED, VS were "
      f"{self.vitals()}. Labs were notable for WBC {r.randint(40, 190) / 10} and Cr {r.randint(8, 30) / 10}.",
      "",
      "Past Medical History:",
      *(f"{i}. {item}" for i, item in enumerate(history, start=1)),
      "",
      "Social History:",
      r.choice(
        (
          "Lives with wife. Former smoker, quit 10 years ago. No EtOH.",
          "Lives alone in [**Location (un) 86**]. Denies tobacco, EtOH or illicit drugs.",
        )
      ),
      "",
      "Physical Exam:",
      f"Vitals: {self.vitals()}",
      f"General: {r.choice(('well-appearing', 'ill-appearing', 'elderly'))} {man} in "
      f"{r.choice(('NAD', 'mild respiratory distress'))}",
      "Lungs: " + r.choice(("CTAB", "bibasilar crackles", "diffuse expiratory wheezes")),
      "CV: RRR, no m/r/g",
      "Ext: " + r.choice(("no edema", "2+ pitting edema bilaterally")),
      "",
      "Pertinent Results:",
      "-" * r.randint(10, 40),
      f"{self.date()} 08:15PM BLOOD WBC-{r.randint(40, 190) / 10} Hgb-{r.randint(80, 150) / 10} "
      f"Plt Ct-{r.randint(90, 400)}",
      f"{self.date()} 08:15PM BLOOD Glucose-{r.randint(70, 250)} UreaN-{r.randint(8, 60)} "
      f"Creat-{r.randint(6, 30) / 10} Na-{r.randint(128, 146)} K-{r.randint(33, 55) / 10}",
      "",
      "Brief Hospital Course:",
      f"{age} yo {sex} admitted with {problem}.",
      f"# {short}: treated with {treatment} with improvement. Transitioned to p.o. regimen on {self.date()}.",
      f"# Acute kidney injury: Cr peaked at {r.randint(15, 30) / 10}, improved with IV fluids.",
      "",
      "Medications on Admission:",
      *(f"{i}. {med}" for i, med in enumerate(meds, start=1)),
      "",
      "Discharge Medications:",
    ]
    for i, med in enumerate(meds, start=1):
      lines += [
        f"{i}. {med.replace(' PO ', ' Tablet Sig: One (1) Tablet PO ')}.",
        f"Disp:*{r.choice((30, 60, 90))} Tablet(s)* Refills:*{r.randint(0, 3)}*",
      ]
    if list_bug:
      lines.append(f"{len(meds) + 1} days of ciprofloxacin were completed prior to discharge.")
    lines += [
      "",
      "Discharge Disposition:",
      r.choice(("Home", "Home With Service", "Extended Care")),
      "",
      "Discharge Diagnosis:",
      f"Primary: {problem}",
      f"Secondary: {', '.join(h.split(',')[0].lower() for h in history)}",
      "",
      "Discharge Condition:",
      r.choice(("Good. Ambulating independently.", "Stable. Ambulating with walker.")),
      "",
      "Discharge Instructions:",
      f"You were admitted to {self.hospital()} for {symptom} due to {problem}. Please take your medications as "
      "prescribed. Call your doctor or return to the ED for chest pain, fever > 101.5 or worsening symptoms.",
      "",
      "Followup Instructions:",
      f"Provider: {self.doctor()}, MD Phone:[**Telephone/Fax (1) {r.randint(1000, 9999)}**] "
      f"Date/Time:{self.date()} {r.randint(8, 16)}:{r.choice(('00', '30'))}",
      "",
      f"                             {self.doctor()} MD [**MD Number(1) {r.randint(100, 999)}**]",
      "",
      f"Completed by:{self.date()}",
    ]
    return "\n".join(lines) + "\n"

  def radiology(self) -> str:
    r = self.rng
    exam, organ = r.choice(_RADIOLOGY_EXAMS)
    findings = r.sample(_FINDINGS[organ], 3)
    rule = "_" * 78
    return (
      "\n".join(
        [
          f"{self.date()} {r.randint(1, 12)}:{r.randint(10, 59)} {r.choice(('AM', 'PM'))}",
          f" {exam}{' ' * 30}Clip # [**Clip Number (Radiology) {r.randint(10000, 99999)}**]",
          f" Reason: eval for {r.choice(('pulmonary edema', 'infiltrate', 'bleed', 'obstruction'))}",
          f" {rule}",
          f" [**Hospital {r.randint(2, 9)}**] MEDICAL CONDITION:",
          f"  {r.randint(40, 90)} year old {r.choice(('man', 'woman'))} with {r.choice(_PROBLEMS)[0]}",
          " REASON FOR THIS EXAMINATION:",
          "  r/o acute process",
          f" {rule}",
          "                                 FINAL REPORT",
          f" INDICATION: {r.choice(('Dyspnea.', 'Fever.', 'Fall.', 'Abdominal pain.'))}",
          "",
          f" COMPARISON: {self.date()}.",
          "",
          f" FINDINGS: {' '.join(findings)}",
          "",
          " IMPRESSION:",
          *(f" {i}. {finding}" for i, finding in enumerate(findings[:2], start=1)),
        ]
      )
      + "\n"
    )

  def nursing(self, invalid_byte: bool) -> str:
    r = self.rng
    degree = _INVALID_BYTE_MARK if invalid_byte else ""
    return (
      "\n".join(
        [
          f"Nursing Progress Note {r.choice(('0700-1900', '1900-0700'))}",
          f"Neuro: A+Ox{r.randint(1, 3)}, MAE, follows commands. Pain controlled with tylenol.",
          f"CV: HR {r.randint(60, 90)}-{r.randint(91, 110)}s SR, no ectopy. Temp {r.randint(970, 1010) / 10}{degree}F.",
          f"Resp: LS {r.choice(('clear', 'coarse'))} upper, diminished bases. O2 sat {r.randint(90, 99)}% on 2L NC.",
          f"GI/GU: abd soft, +BS. Foley draining clear yellow urine {r.randint(30, 60)}-{r.randint(61, 150)}cc/hr.",
          f"Social: {r.choice(('wife', 'daughter', 'son'))} {self.name()} called, updated on plan of care.",
          "Plan: continue current plan, monitor lytes, OOB to chair.",
        ]
      )
      + "\n"
    )

  def nursing_other(self) -> str:
    r = self.rng
    return (
      "\n".join(
        [
          f"NPN {r.choice(('7a-7p', '7p-7a'))}",
          f"Pt alert and oriented. VSS. Ambulated in hall x{r.randint(1, 3)} with assist.",
          f"Tolerating diet. Voiding qs. Skin intact. Family visited; questions answered by RN {self.name()}.",
        ]
      )
      + "\n"
    )

  def ecg(self) -> str:
    r = self.rng
    return (
      " ".join(r.sample(_ECG_FINDINGS, r.randint(2, 4)))
      + f"\nSince the previous tracing of {self.date()} no significant change.\n"
    )

  def physician(self) -> str:
    r = self.rng
    problem, _, _, treatment = r.choice(_PROBLEMS)
    return (
      "\n".join(
        [
          f"Chief Complaint: {r.choice(('hypoxia', 'hypotension', 'altered mental status'))}",
          "   24 Hour Events:",
          f"   - started {treatment}",
          f"   - {r.choice(('diuresed 1.5 L', 'transfused 1 unit PRBC', 'weaned to 2L NC'))}",
          "-" * 20,
          f"   Vital signs: {self.vitals()}",
          "   Assessment and Plan",
          f"   {r.randint(40, 90)} yo with {problem}. Continue {treatment}. Dr. {self.name()} aware.",
          f"   ICU Care: Nutrition: {r.choice(('NPO', 'Regular diet', 'Cardiac diet'))}",
        ]
      )
      + "\n"
    )

  def respiratory(self) -> str:
    r = self.rng
    return (
      f"Respiratory Care\nPt remains on PSV {r.randint(5, 15)}/5, FiO2 {r.choice((30, 40, 50))}%. "
      f"RSBI {r.randint(30, 120)}. Plan to trial SBT in AM.\n"
    )


_KINDS = (  # (category, description, weight)
  ("Discharge summary", "Report", 30),
  ("Radiology", "CHEST (PORTABLE AP)", 20),
  ("Nursing", "Nursing Progress Note", 15),
  ("Nursing/other", "Report", 10),
  ("ECG", "Report", 10),
  ("Physician ", "Physician Resident Progress Note", 10),
  ("Respiratory ", "Respiratory Care Shift Note", 5),
)


def _note_text(writer: _Writer, category: str, row: int, discharge_count: int) -> str:
  if category == "Discharge summary":
    # The first discharge summary always has the two-placeholder line; every third one trips section bug 1.
    return writer.discharge_summary(quirk_line=discharge_count % 2 == 0, list_bug=discharge_count % 3 == 2)
  if category == "Radiology":
    return writer.radiology()
  if category == "Nursing":
    return writer.nursing(invalid_byte=row == INVALID_UTF8_ROW)
  if category == "Nursing/other":
    return writer.nursing_other()
  if category == "ECG":
    return writer.ecg()
  if category == "Physician ":
    return writer.physician()
  return writer.respiratory()


def _csv_field(value: str | int | None) -> str:
  """MIMIC's quoting: integers and empty fields bare, strings double-quoted with quotes doubled."""
  if value is None:
    return ""
  if isinstance(value, int):
    return str(value)
  return '"' + value.replace('"', '""') + '"'


def generate(num_notes: int, seed: int) -> bytes:
  """The CSV file (bytes: it contains one deliberately invalid UTF-8 byte) for `num_notes` notes and `seed`."""
  if num_notes < MIN_NOTES:
    raise UserError(f"--num_notes={num_notes} is too small; use at least {MIN_NOTES} so every special case fits")
  rng = random.Random(seed)
  writer = _Writer(rng)
  categories = [kind for kind, _, weight in _KINDS for _ in range(weight)]
  descriptions = {kind: description for kind, description, _ in _KINDS}
  forced = {0: "Discharge summary", ISERROR_ROW: "Discharge summary", INVALID_UTF8_ROW: "Nursing"}
  lines = [",".join(_csv_field(column) for column in COLUMNS)]
  discharge_count = 0
  for row in range(num_notes):
    category = forced.get(row) or rng.choice(categories)
    if row in (EMPTY_ROW, WHITESPACE_ROW):
      text = "" if row == EMPTY_ROW else "  \n \n"
    else:
      text = _note_text(writer, category, row, discharge_count)
    discharge_count += category == "Discharge summary"
    day = f"2150-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    timed = category not in ("Discharge summary", "ECG")
    time = f"{day} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00"
    fields = (
      row + 1,
      10000 + rng.randint(0, 89999),
      100000 + rng.randint(0, 899999),
      day,
      time if timed else None,
      time if timed else None,
      category,
      descriptions[category],
      rng.randint(14000, 21000) if timed else None,
      1 if row == ISERROR_ROW else None,
      text,
    )
    lines.append(",".join(_csv_field(value) for value in fields))
  return ("\n".join(lines) + "\n").encode("utf-8").replace(_INVALID_BYTE_MARK.encode("utf-8"), _INVALID_BYTE)


def main(argv: Sequence[str]) -> None:
  data = generate(flags.FLAGS.num_notes, flags.FLAGS.seed)
  with atomic_write(flags.FLAGS.output, mode="wb") as handle:
    handle.write(data)


def _define_flags() -> None:
  flags.DEFINE_string("output", None, "CSV file to write (NOTEEVENTS layout, upper-case headers).")
  flags.DEFINE_integer("num_notes", 100, f"Number of rows (at least {MIN_NOTES}).")
  flags.DEFINE_integer("seed", 12345, "Random seed; the same seed and --num_notes give the same bytes.")
  flags.mark_flag_as_required("output")


if __name__ == "__main__":
  _define_flags()
  run_absl(main)
