"""Accounts behind bearer tokens and tickets, looked up per batch of opening streams (events.delivery.auth)."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission

from events.delivery import auth


@pytest.mark.django_db
def test_users_seen_for_the_first_time_are_created_together_and_known_users_keep_their_rights(
    django_assert_max_num_queries: Any,
) -> None:
    users = get_user_model().objects
    boss = users.create(username="boss")
    boss.user_permissions.add(Permission.objects.get(codename="view_all_process_instances"))
    users.create(username="ana")
    names = ["ana", "boss"] + [f"new-{i}" for i in range(50)]
    with django_assert_max_num_queries(6):  # not three per new user
        accounts = auth._load_by_usernames(names)
    assert set(accounts) == set(names)
    assert accounts["boss"].view_all
    assert not accounts["ana"].view_all
    assert not accounts["new-7"].view_all
    assert users.filter(username__startswith="new-").count() == 50
    assert accounts["new-7"].user_id == users.get(username="new-7").pk
    assert accounts["new-7"].active
    # Seen again (or created meanwhile by another process): found, never created twice.
    assert auth._load_by_usernames(["new-7", "new-8"])["new-7"].user_id == accounts["new-7"].user_id
    assert users.filter(username="new-7").count() == 1
