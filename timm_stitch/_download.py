"""Downloading a release file into timm's cache, so that a bad network never leaves a file that looks complete.

The file is streamed to a temp name beside the cache file (see :mod:`timm_stitch._io`), checked against the length
the server announced, and only then renamed to its cache name. A server that sends nothing for
``HF_HUB_DOWNLOAD_TIMEOUT`` seconds (huggingface_hub's setting, default 10) times out; every failure is an
:class:`DownloadError` (an ``OSError``) naming the URL and the cache file. The client is the standard library's
``urllib``, as in ``torch.hub.download_url_to_file`` (which timm calls), with the timeout and the length check that
one lacks.
"""
from __future__ import annotations

import http.client
import os
import urllib.error
from pathlib import Path
from urllib.request import Request, urlopen

from huggingface_hub import constants

from ._io import atomic_path
from .errors import DownloadError

__all__ = ['DownloadError', 'download_url', 'download_timeout']


def download_timeout() -> float:
    """Seconds a download may wait for data: ``HF_HUB_DOWNLOAD_TIMEOUT``, as for the Hub's downloads."""
    return float(constants.HF_HUB_DOWNLOAD_TIMEOUT)


def download_url(url: str, dst: os.PathLike, what: str) -> None:
    """Download ``url`` to ``dst`` (see the module docstring); ``what`` names the file in errors."""
    dst, timeout = Path(dst), download_timeout()
    got = 0
    try:
        with atomic_path(dst) as tmp, urlopen(Request(url, headers={'User-Agent': 'timm-stitch'}),
                                              timeout=timeout) as response:
            expected = response.headers.get('Content-Length')
            with open(tmp, 'wb') as f:
                for chunk in iter(lambda: response.read1(1 << 20), b''):
                    f.write(chunk)
                    got += len(chunk)
            if expected is not None and got != int(expected):
                raise http.client.IncompleteRead(b'', int(expected) - got)
    except http.client.IncompleteRead:
        why = f'the server closed the connection after {got} of {expected} bytes'
    except TimeoutError:
        why = (f'the server sent nothing for {timeout:g} s (after {got} bytes; the limit is HF_HUB_DOWNLOAD_TIMEOUT, '
               'in seconds: raise it for a slow mirror)')
    except ConnectionError as e:
        why = f'the connection was lost after {got} bytes ({type(e).__name__}: {e.strerror or e})'
    except urllib.error.URLError as e:
        why = str(getattr(e, 'reason', e))
    except OSError as e:  # the cache cannot be written
        why = str(e)
    else:
        return
    raise DownloadError(f'cannot download {what} from {url} into {dst}: {why}. Nothing was written there; try again '
                        '(check the network or the mirror URL), or put the file there yourself')
