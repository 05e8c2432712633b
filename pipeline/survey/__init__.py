"""Human attack-detection survey (paper §4.5): image sets, the web app, response storage and analysis.

`images` builds the 8-bit image set of one attacked checkpoint; `store` keeps participants, their assigned
items and answers in any SQLAlchemy database; `app` serves the protocol (Starlette); `analysis` turns the
exported responses into detection rates, false alarms and d′. Only `images` needs torch.
"""
