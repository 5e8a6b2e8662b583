"""Evaluation: metrics on the test split, figures, the report page, export and predict."""
