"""The ``flwr`` CLI's connection to a SuperLink, in a private ``FLWR_HOME``."""

from __future__ import annotations

from pathlib import Path


def connection_toml(name: str, address: str, ca: Path | None) -> str:
    """A ``flwr`` CLI connection to the SuperLink at ``address`` (``ca`` None: insecure)."""
    trust = "insecure = true" if ca is None else f'root-certificates = "{ca.resolve()}"'
    return f'[superlink.{name}]\naddress = "{address}"\n{trust}\n'


def write_connection(flwr_home: Path, name: str, address: str, ca: Path | None) -> None:
    """A private FLWR_HOME whose default connection is ``name``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n' + connection_toml(name, address, ca)
    )
