"""The broker's authorization state: mosquitto's dynamic-security plugin, managed live over MQTT.

Who may do what is held by the plugin (``dynamic-security.json`` on the broker)
and changed while the broker runs by publishing commands to
``$CONTROL/dynamic-security/v1`` — what ``mosquitto_ctrl`` does, done here with
the agent's MQTT link so the operator's box needs no mosquitto-clients.

The rules, all checked by mosquitto at SUBSCRIBE time and again at delivery:

* each device ``NAME`` is a client with its own role ``device-NAME``: it may
  subscribe (literally, no wildcard) to its jobs, cancels and desired model, and
  publish its status, telemetry, results, model state and replies;
* each group ``G`` is a group with the role ``group-G``: its members may
  subscribe to ``$share/G/PREFIX/groups/G/jobs`` (a shared subscription is
  checked as the literal filter, ``$share/`` included) and to the group's desired
  model;
* an operator is a client with the role ``fleet-admin``: only the
  ``$CONTROL/dynamic-security`` API (its data traffic goes through the operators'
  listener, see ``setup``);
* anything else is denied (``defaultACLAccess``).

Pure rule builders are apart from ``DynSec``, the one class that talks to the broker.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from collections.abc import Iterable
from typing import Any

from agent.link.mqtt import Message, SubscribeRefused
from edge_contract.errors import LinkError
from edge_contract.protocol import GroupTopics, Topics

from .broker import BrokerOptions, FleetError, open_client

CONTROL = "$CONTROL/dynamic-security/v1"
RESPONSE = f"{CONTROL}/response"
ADMIN_ROLE = "fleet-admin"


def device_role(name: str) -> str:
    """The role holding device ``name``'s own topics."""
    return f"device-{name}"


def group_role(group: str) -> str:
    """The role (and the dynsec group) of fleet group ``group``."""
    return f"group-{group}"


def _acl(kind: str, topic: str) -> dict[str, Any]:
    return {"acltype": kind, "topic": topic, "allow": True}


def _readable(topics: Iterable[str], subscribe_as: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Subscribe (literal filters) and receive rules for ``topics``; ``subscribe_as`` adds filters."""
    acls = [_acl("subscribeLiteral", t) for t in topics]
    acls += [_acl("subscribeLiteral", t) for t in subscribe_as]
    acls += [_acl("publishClientReceive", t) for t in topics]
    return acls


def device_acls(name: str, prefix: str = "edge") -> list[dict[str, Any]]:
    """What device ``name`` may read and write: its own topics, nothing else."""
    own = Topics(prefix, name)
    acls = _readable([own.jobs, own.cancel, own.model_desired, *fleet_pushed(name, prefix)])
    for topic in (own.status, own.telemetry, own.results, own.model_state, own.renew_csr, own.replies):
        acls.append(_acl("publishClientSend", topic))
    return acls


def fleet_pushed(name: str, prefix: str = "edge") -> list[str]:
    """Topics the fleet pushes to a device since issue 24: its membership and its renewed certificate."""
    own = Topics(prefix, name)
    return [own.membership, own.renew_answer]


def group_acls(group: str, prefix: str = "edge") -> list[dict[str, Any]]:
    """What a member of ``group`` may read: the group's jobs (shared subscription) and desired model."""
    topics = GroupTopics(prefix, group)
    return _readable([topics.jobs, topics.model_desired], subscribe_as=[topics.shared_jobs])


def admin_acls() -> list[dict[str, Any]]:
    """The dynamic-security API, nothing more."""
    topic = "$CONTROL/dynamic-security/#"
    return [
        _acl("publishClientSend", topic),
        _acl("publishClientReceive", topic),
        _acl("subscribePattern", topic),
    ]


#: PBKDF2 rounds of a stored password (the plugin reads the count from each record).
PASSWORD_ROUNDS = 10_000


def password_record(password: str) -> dict[str, Any]:
    """The plugin's stored form of ``password``: PBKDF2-HMAC-SHA512, a 12-byte salt, base64."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PASSWORD_ROUNDS, dklen=64)
    return {
        "salt": base64.b64encode(salt).decode(),
        "password": base64.b64encode(digest).decode(),
        "iterations": PASSWORD_ROUNDS,
    }


def initial_state(operators: Iterable[str], passwords: dict[str, str] | None = None) -> dict[str, Any]:
    """A fresh ``dynamic-security.json``: everything denied, ``operators`` may administer
    (logging in with ``passwords[name]`` when given: the devices' listener without certificates)."""
    return {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": [
            {
                "username": name,
                "textname": "edge-fleet operator",
                "roles": [{"rolename": ADMIN_ROLE}],
                **(password_record(passwords[name]) if passwords and name in passwords else {}),
            }
            for name in operators
        ],
        "groups": [],
        "roles": [{"rolename": ADMIN_ROLE, "acls": admin_acls()}],
    }


class DynSec:
    """A live connection to the broker's dynamic-security API (one request at a time).

    Connects to the devices' listener (where the plugin runs) as the operator's
    certificate identity; a command the plugin rejects raises ``FleetError`` with
    its reason.
    """

    # A dynsec answer takes milliseconds; 10 s covers a busy broker and a slow link.
    TIMEOUT_S = 10.0

    def __init__(self, options: BrokerOptions) -> None:
        self.options = options
        self._responses: list[dict[str, Any]] = []
        self._answered = threading.Condition()
        self._dropped: list[str] = []
        self.client = open_client(
            options, name="edge-fleet-admin", timeout=self.TIMEOUT_S, on_drop=self._on_drop
        )
        self.client.route(RESPONSE, self._on_message)
        try:
            self.client.subscribed(RESPONSE, timeout=self.TIMEOUT_S)
        except LinkError as exc:
            self.close()
            who = self.options.cert.stem if self.options.cert else "this login"
            why = exc.reason if isinstance(exc, SubscribeRefused) else "no answer"
            raise FleetError(
                f"the broker at {options.host}:{options.address[1]} refused the dynamic-security API "
                f"({why}): not authorized as {who}; identity commands "
                "need an operator certificate (edge-fleet provision NAME --operator, registered by "
                "`edge-fleet broker init --operator NAME`) on the devices' port (--admin-port)"
            ) from exc

    def __enter__(self) -> DynSec:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Disconnect."""
        self.client.close()

    def _on_drop(self, reason: str) -> None:
        with self._answered:
            self._dropped.append(reason)
            self._answered.notify_all()

    def _on_message(self, msg: Message) -> None:
        try:
            responses = json.loads(msg.payload).get("responses", [])
        except (ValueError, AttributeError):
            return
        with self._answered:
            self._responses.extend(r for r in responses if isinstance(r, dict))
            self._answered.notify_all()

    def run(self, *commands: dict[str, Any], allow: Iterable[str] = ()) -> list[dict[str, Any]]:
        """Send ``commands`` in one request; returns one response each.

        An error whose text contains one of ``allow`` (e.g. "already exists") is not raised.
        """
        with self._answered:
            self._responses.clear()
        self.client.publish(CONTROL, json.dumps({"commands": list(commands)}))
        with self._answered:
            done = self._answered.wait_for(
                lambda: len(self._responses) >= len(commands) or bool(self._dropped), self.TIMEOUT_S
            )
            if self._dropped and len(self._responses) < len(commands):
                raise FleetError(
                    f"the broker closed the identity connection ({self._dropped[0]}): the devices' listener "
                    "allows one connection per identity, so another identity command as the same operator "
                    "probably ran at the same time; run this one again (it is safe to repeat)"
                )
            if not done:
                raise FleetError(
                    f"the broker did not answer the dynamic-security request within {self.TIMEOUT_S:.0f} s "
                    f"(is the plugin loaded on {self.options.host}:{self.options.address[1]}?)"
                )
            responses = list(self._responses)
        allowed = list(allow)
        for command, response in zip(commands, responses, strict=False):
            error = response.get("error")
            if error and not any(text in str(error) for text in allowed):
                raise FleetError(f"{command['command']}: {error}")
        return responses

    # -- fleet operations ------------------------------------------------------------------------

    def get_client(self, name: str) -> dict[str, Any] | None:
        """The plugin's record of client ``name``, or None."""
        (response,) = self.run({"command": "getClient", "username": name}, allow=["not found"])
        client = response.get("data", {}).get("client")
        return client if isinstance(client, dict) else None

    def list_clients(self) -> list[dict[str, Any]]:
        """Every client the plugin holds (devices and operators)."""
        (response,) = self.run({"command": "listClients", "verbose": True, "count": -1})
        clients = response.get("data", {}).get("clients", [])
        return [c for c in clients if isinstance(c, dict)]

    def ensure_group(self, group: str, prefix: str) -> None:
        """Create group ``group`` and its role if missing (idempotent)."""
        role = group_role(group)
        self.run(
            {"command": "createRole", "rolename": role, "acls": group_acls(group, prefix)},
            {"command": "createGroup", "groupname": role},
            {"command": "addGroupRole", "groupname": role, "rolename": role},
            allow=["already exists", "already in"],
        )

    def add_device(self, name: str, group: str | None, prefix: str, password: str | None = None) -> None:
        """Register device ``name`` (its role, its group): its certificate works at once.

        ``password``: the device logs in with it (a broker set up with ``--device-logins``); the
        plugin then also binds the login to the client id ``name``.
        """
        existing = self.get_client(name)
        if existing is not None and any(r.get("rolename") == ADMIN_ROLE for r in existing.get("roles", [])):
            raise FleetError(f"{name!r} is an operator on this broker; choose another device name")
        self.run(
            {"command": "createRole", "rolename": device_role(name), "acls": device_acls(name, prefix)},
            allow=["already exists"],
        )
        login = {"password": password, "clientid": name} if password is not None else {}
        if existing is None:
            self.run(
                {
                    "command": "createClient",
                    "username": name,
                    "textname": "edge-agent device",
                    "roles": [{"rolename": device_role(name)}],
                    **login,
                }
            )
        else:
            # Re-provisioning (or a revoked device brought back): its own role, enabled.  A role
            # the client holds already is not added again (mosquitto 2.0.11 answers "Internal
            # error" to that, which made a retried enrollment fail for ever).
            held = {r.get("rolename") for r in existing.get("roles", [])}
            add = (
                []
                if device_role(name) in held
                else [{"command": "addClientRole", "username": name, "rolename": device_role(name)}]
            )
            self.run(*add, {"command": "enableClient", "username": name}, allow=["already"])
            if password is not None:
                self.run({"command": "setClientPassword", "username": name, "password": password})
                self.run({"command": "setClientId", "username": name, "clientid": name})
        self.set_group(name, group, prefix)

    def set_group(self, name: str, group: str | None, prefix: str) -> list[str]:
        """Make ``group`` device ``name``'s only group (None: no group); returns the groups it left."""
        client = self.get_client(name)
        if client is None:
            raise FleetError(f"{name!r} is not a device on this broker; provision it first")
        current = [g.get("groupname", "") for g in client.get("groups", [])]
        wanted = group_role(group) if group else None
        left = [g for g in current if g != wanted]
        for old in left:
            self.run({"command": "removeGroupClient", "groupname": old, "username": name})
        self.grant_membership(name, prefix)
        if wanted and wanted not in current:
            self.ensure_group(group or "", prefix)
            self.run({"command": "addGroupClient", "groupname": wanted, "username": name})
        if left:
            # Subscriptions granted under the old group stay in its session until the device
            # reconnects and renews them: disconnect it now (the agent reconnects at once).
            self.kick(name)
        return [g.removeprefix("group-") for g in left]

    def grant_membership(self, name: str, prefix: str) -> None:
        """Let device ``name`` read its membership and renewal topics (roles made before issue 24 lack them)."""
        acls = [
            *_readable(fleet_pushed(name, prefix)),
            _acl("publishClientSend", Topics(prefix, name).renew_csr),
        ]
        self.run(
            *({"command": "addRoleACL", "rolename": device_role(name), **acl} for acl in acls),
            allow=["already", "exists"],
        )

    def kick(self, name: str) -> None:
        """Disconnect ``name`` now (disable then enable: the plugin's way to kick)."""
        self.run(
            {"command": "disableClient", "username": name},
            {"command": "enableClient", "username": name},
        )

    def revoke(self, name: str) -> None:
        """Cut device ``name`` off: every role and group taken, disabled, disconnected.

        mosquitto 2.0 does not consult the plugin at CONNECT for certificate logins,
        so a disabled client could still connect: what stops it is that it has no
        right left — every SUBSCRIBE and PUBLISH of it is refused.
        """
        client = self.get_client(name)
        if client is None:
            raise FleetError(f"{name!r} is not a device on this broker (nothing to revoke)")
        if any(r.get("rolename") == ADMIN_ROLE for r in client.get("roles", [])):
            raise FleetError(f"{name!r} is an operator, not a device")
        commands: list[dict[str, Any]] = [
            {"command": "removeClientRole", "username": name, "rolename": r["rolename"]}
            for r in client.get("roles", [])
        ]
        commands += [
            {"command": "removeGroupClient", "groupname": g["groupname"], "username": name}
            for g in client.get("groups", [])
        ]
        commands.append({"command": "disableClient", "username": name})
        self.run(*commands)
