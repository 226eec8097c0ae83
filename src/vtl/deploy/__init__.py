"""Dynamic deployment of transport functions into running endpoints.

See docs/deployment.md: package format (:mod:`.package`), trust
(:mod:`.trust`), lifecycle (:mod:`.deployer`) and the local control socket
(:mod:`.control`)."""

from vtl.deploy.deployer import Deployer, Deployment
from vtl.deploy.errors import DeployError, InUseError, TrustError
from vtl.deploy.trust import TrustPolicy, keygen, sign

__all__ = [
    "DeployError",
    "Deployer",
    "Deployment",
    "InUseError",
    "TrustError",
    "TrustPolicy",
    "keygen",
    "sign",
]
