"""`netanatomy serve DIR`: serve an atlas folder read-only on 127.0.0.1."""
from __future__ import annotations

import click


@click.command("serve")
@click.argument("folder", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (the default is reachable from this machine only).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port (0: any free port).")
@click.option("--log", is_flag=True, help="Log every request on stderr.")
def command(folder, host, port, log) -> None:
    """Serve DIR (an atlas written by 'netanatomy survey') read-only: GET and HEAD only, no
    directory listings, and no path outside DIR reachable (.., encoded .., symlinks out)."""
    from ...atlas.server import make_server

    server = make_server(folder, host, port, quiet=not log)
    h, p = server.server_address[:2]
    click.echo(f"serving {folder} at http://{h}:{p}/ (read-only; Ctrl-C stops)", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("stopped", err=True)
    finally:
        server.server_close()
