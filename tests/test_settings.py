"""Settings are read once from the environment; production settings have no secret defaults and pass
Django's deployment checks."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCTION = {
    "DJANGO_SECRET_KEY": "x7!q-9mZp2$Lr4vWn8@Ks6&Hd3^Fj5*Tb1(Yc0)Ge-Ua_Ro+Ei=Ow~Py",
    "DJANGO_ALLOWED_HOSTS": "events.example.com",
    "DATABASE_URL": "sqlite:////tmp/events-gateway-check.sqlite3",
}


def manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "JWT_"))}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**clean, "DJANGO_SETTINGS_MODULE": "gateway_project.settings", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_deploy_is_clean_with_production_settings() -> None:
    result = manage("check", "--deploy", "--fail-level", "WARNING", **PRODUCTION)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_secret_key_has_no_default_outside_debug() -> None:
    env = {k: v for k, v in PRODUCTION.items() if k != "DJANGO_SECRET_KEY"}
    result = manage("check", **env)
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY is required unless DJANGO_DEBUG=true" in result.stderr


def test_debug_defaults_to_false() -> None:
    result = manage("shell", "-c", "from django.conf import settings; print(settings.DEBUG)", **PRODUCTION)
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_bad_choices_are_refused_at_start() -> None:
    result = manage("check", AUDIT_DELIVERIES="sometimes", **PRODUCTION)
    assert result.returncode != 0
    assert "AUDIT_DELIVERIES must be all, failures or off" in result.stderr


def test_every_setting_is_documented_in_env_example() -> None:
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.MULTILINE))
    read = set(re.findall(r'env\.\w+\(\s*"([A-Z_]+)"', (ROOT / "gateway_project" / "settings.py").read_text()))
    assert read
    assert read - documented == set()
