"""`m4 serve`'s settings and its refusal to listen beyond loopback without a key.

Importable without the [serve] extra: the CLI takes its defaults from here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from m4.errors import M4Error


@dataclass
class Settings:
    model: str = "demo"
    backend: str = "auto"
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    insecure: bool = False
    max_sessions: int = 4
    session_ttl: float = 300.0
    max_fps: float = 10.0
    max_body_mb: float = 20.0
    max_pixels: int = 4096 * 4096
    max_images: int = 16
    max_tokens: int = 512  # an answer's length where the request gives none
    max_queue: int = 32
    video_frames: int = 8
    allow_urls: bool = False
    allow_private_urls: bool = False
    image_cache_mb: float = 128.0  # image embeddings kept (m4.runtime.reuse)
    prefix_cache_mb: float = 256.0  # prompts' keys and values kept
    no_cache: bool = False  # both caches off


def check_bind(host: str, api_key: str | None, insecure: bool) -> None:
    """Loopback unless the operator set a key or said --insecure."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not api_key and not insecure:
        raise M4Error(f"refusing to listen on {host} without --api-key: anyone who reaches it could use the model "
                      "(--insecure to do it anyway)")
