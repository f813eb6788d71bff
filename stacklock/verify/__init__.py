"""Verification: the stage-by-stage comparison, goldens, the record/verify session and the certificate."""
