"""The agency node: encrypted case store, staff access, HTCDS import and export, audit log."""
