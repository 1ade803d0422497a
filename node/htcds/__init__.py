"""HTCDS case data: the field catalogue, validation, and CSV/XLSX import and export.

Implements DESIGN.md section 2. Everything here is pure: no database, no network; files are
read and written, nothing else. The modules, each importable on its own:

- :mod:`~node.htcds.catalogue`: the HTCDS v2.0 fields, aliases and consent data categories;
- :mod:`~node.htcds.validate`: checking and normalising one record (``validate_record``);
- :mod:`~node.htcds.reading`: the rows of a .csv or .xlsx file (``read_table``, ``count_rows``);
- :mod:`~node.htcds.report`: a whole file checked (``validate_file``) and its rejects written;
- :mod:`~node.htcds.csv_format` and :mod:`~node.htcds.xlsx_format`: the two file formats;
- :mod:`~node.htcds.files`: what both formats share (atomic private exports, export columns);
- :mod:`~node.htcds.synthetic`: fictional records for tests, benchmarks and the demo.

This package re-exports the public names, so ``from node import htcds`` then ``htcds.X`` keeps
working; new code imports from the module that defines a name. docs/data-model.md describes
the fields, the data categories and the quirks accepted.
"""

from __future__ import annotations

from node.htcds.catalogue import (
    ALIASES,
    COUNTRY_CODES,
    DATA_CATEGORIES,
    FIELD_BY_NAME,
    FIELD_CATEGORY,
    FIELD_NAMES,
    FIELDS,
    IDENTIFYING_FIELDS,
    REPORT_COLUMNS,
    TESSERA_PREFIX,
    FieldKind,
    FieldSpec,
    canonical_field,
    fields_in,
)
from node.htcds.csv_format import csv_cell, csv_value, write_csv
from node.htcds.reading import MAX_FILE_BYTES, MAX_ROWS, SourceRow, count_rows, read_table
from node.htcds.report import ValidationReport, validate_file, write_rejects
from node.htcds.synthetic import synthetic_records
from node.htcds.validate import MAX_TEXT_CHARS, FieldError, validate_record
from node.htcds.xlsx_format import write_xlsx
from tessera.needs import NEED_CATEGORIES, NEED_STATUSES, NeedCategory, NeedStatus

__all__ = [
    "ALIASES",
    "COUNTRY_CODES",
    "DATA_CATEGORIES",
    "FIELDS",
    "FIELD_BY_NAME",
    "FIELD_CATEGORY",
    "FIELD_NAMES",
    "IDENTIFYING_FIELDS",
    "MAX_FILE_BYTES",
    "MAX_ROWS",
    "MAX_TEXT_CHARS",
    "NEED_CATEGORIES",
    "NEED_STATUSES",
    "REPORT_COLUMNS",
    "TESSERA_PREFIX",
    "FieldError",
    "FieldKind",
    "FieldSpec",
    "NeedCategory",
    "NeedStatus",
    "SourceRow",
    "ValidationReport",
    "canonical_field",
    "count_rows",
    "csv_cell",
    "csv_value",
    "fields_in",
    "read_table",
    "synthetic_records",
    "validate_file",
    "validate_record",
    "write_csv",
    "write_rejects",
    "write_xlsx",
]
