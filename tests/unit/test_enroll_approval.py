"""The pending-enrollment queue and the claim's labels (``edge_fleet.approval``, ``enroll``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.enroll import csr_for
from edge_contract.protocol import EnrollRequest
from edge_fleet import approval
from edge_fleet.enroll import parse_labels
from edge_fleet.errors import FleetError


def _request(name: str, key: ec.EllipticCurvePrivateKey) -> EnrollRequest:
    return EnrollRequest(name=name, csr=csr_for(name, key))


def test_the_same_box_asking_again_replaces_its_entry_another_key_is_refused(tmp_path: Path) -> None:
    mine, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    assert approval.file_request(tmp_path, "claim-c", "n1", _request("box-1", mine), mine.public_key()) == ""
    assert approval.file_request(tmp_path, "claim-c", "n2", _request("box-1", mine), mine.public_key()) == ""
    [entry] = approval.listing(tmp_path)
    assert entry.nonce == "n2" and entry.fingerprint == approval.fingerprint(mine.public_key())
    problem = approval.file_request(tmp_path, "claim-c", "n3", _request("box-1", other), other.public_key())
    assert "already waiting for approval with another key" in problem
    assert approval.take(tmp_path, "box-1").nonce == "n2"
    with pytest.raises(FleetError, match="no enrollment of 'box-1' is waiting"):
        approval.take(tmp_path, "box-1")


def test_a_rejection_names_the_identity_the_claim_and_the_fix() -> None:
    answer = approval.rejected("box-9", "claim-c", "not ours")
    assert answer.error is not None and answer.cert is None and not answer.pending
    assert "rejected the enrollment of box-9 under claim-c (not ours)" in answer.error
    assert "edge-fleet approve" in answer.error


def test_claim_labels_are_checked_and_the_flag_named() -> None:
    assert parse_labels(["site=shop3", "hw=pi5"]) == {"site": "shop3", "hw": "pi5"}
    with pytest.raises(FleetError, match="--label 'site': give KEY=VALUE"):
        parse_labels(["site"])
    with pytest.raises(FleetError, match="--label site"):
        parse_labels(["site=a\nb"])
    with pytest.raises(FleetError, match="a --label key"):
        parse_labels(["#=x"])
