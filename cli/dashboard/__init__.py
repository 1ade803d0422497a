"""``tessera stats dashboard``: the coordinator's read-only view of broker-signed releases.

A small aiohttp server renders jinja2 templates and SVG charts drawn here from the numbers of
releases whose broker signature the dashboard has checked (DESIGN.md section 7). Modules:

- :mod:`cli.dashboard.releases`: which releases may be drawn (each signature checked, pure);
- :mod:`cli.dashboard.views`: a release, a heat map and a trend as what the templates show;
- :mod:`cli.dashboard.svg`: the geometry of the bar and trend charts;
- :mod:`cli.dashboard.listen`: ``--listen``, loopback and the TLS material;
- :mod:`cli.dashboard.server`: the web application and its security headers;
- :mod:`cli.dashboard.command`: the thin Typer command.

Importing this package imports nothing heavy, so ``tessera --help`` stays fast.
"""
