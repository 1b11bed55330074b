"""This process's name in audits and consumer groups: host:pid."""

from __future__ import annotations

import os
import socket

INSTANCE = f"{socket.gethostname()}:{os.getpid()}"
