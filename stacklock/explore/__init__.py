"""Exploring stacks by measurement: ``bisect`` (which link changed the output) and ``matrix`` (how much each
link's choices change it). Planning and attribution are pure; running goes through :mod:`stacklock.verify.session`
and the engine sessions of :mod:`stacklock.engines.runner`."""
