"""JSON Schemas for the KubeRay ``ray.io/v1`` resources in ``deploy/``: a hand transcription, not the CRDs.

The real CRDs (ray-project/kuberay ``ray-operator/config/crd/bases/ray.io_rayjobs.yaml`` and
``ray.io_rayservices.yaml``) are over 1 MB each, mostly the embedded Kubernetes pod template schema. This
module transcribes, from the v1 Go types (``ray-operator/apis/ray/v1/{rayjob,rayservice,raycluster}_types.go``,
json tag names and Go types, as of v1.7.0), the levels sidforge's manifests use:

- ``RayJob.spec`` and ``RayService.spec``: every top-level field, with its type;
- ``RayClusterSpec`` (``rayClusterSpec`` of a RayJob, ``rayClusterConfig`` of a RayService), its
  ``authOptions``, ``headGroupSpec`` and ``workerGroupSpecs[]``: every field, with its type;
- the enums: ``submissionMode``, ``upgradeStrategy.type``, ``authOptions.mode``, ``managedBy``, the
  deletion policies.

Each transcribed level sets ``additionalProperties: false``, so a misspelled field fails here the way
``kubectl apply --validate=strict`` fails on the real schema. Below those levels the check is light: a
pod template needs ``spec.containers[]``, each with a ``name`` and an ``image`` (stricter than Kubernetes,
where ``image`` may be left to a controller), and ``volumes`` / ``volumeMounts`` must be arrays of named
entries; container resources, probes, ``autoscalerOptions``, ``headService``, ``serveService`` and the like
are only required to be objects.

What this does not cover: the pod template's own schema, quantities and label formats, CEL rules
(``x-kubernetes-validations``, e.g. that ``managedBy`` is immutable), defaults, and fields newer or older
than v1.7.0. Fields seen only in post-v1.7 sources (``RayJob.spec.preRunningDeadlineSeconds``,
``retryRayClusterStrategy``; ``RayClusterSpec.tlsOptions``, ``networkPolicy``, ``historyServerOptions``;
``headGroupSpec.ingressOptions``; ``workerGroupSpecs[].priority``) are left out: add one here, after
checking the release, when a manifest needs it. Some enums (``submissionMode``, ``upgradeStrategy.type``)
are checked by the operator rather than by the CRD's OpenAPI schema, so the API server would store a
wrong value and the operator would then refuse the resource; this schema rejects it up front.

The full check is ``kubectl apply --dry-run=server -f deploy/`` on a cluster with KubeRay installed.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

KUBERAY_VERSION = "v1.7.0"

INT32: Schema = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
NON_NEGATIVE_INT32: Schema = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
BOOLEAN: Schema = {"type": "boolean"}
STRING: Schema = {"type": "string"}
NUMBER: Schema = {"type": "number"}
OBJECT: Schema = {"type": "object"}  # a Kubernetes type this transcription does not descend into
STRING_MAP: Schema = {"type": "object", "additionalProperties": {"type": "string"}}  # map[string]string

SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
UPGRADE_TYPES = ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
AUTH_MODES = ("disabled", "token")
MANAGED_BY = ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue")
DELETION_POLICIES = ("DeleteCluster", "DeleteWorkers", "DeleteSelf", "DeleteNone")


def closed(properties: dict[str, Schema], required: tuple[str, ...] = ()) -> Schema:
    """An object with exactly these fields (``additionalProperties: false``)."""
    out: Schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        out["required"] = list(required)
    return out


def enum(values: tuple[str, ...]) -> Schema:
    return {"type": "string", "enum": list(values)}


# ----------------------------------------------------------------------------------------------
# Kubernetes types, checked lightly (open objects)

_NAMED: Schema = {"type": "object", "required": ["name"], "properties": {"name": STRING}}

VOLUME_MOUNT: Schema = {
    "type": "object",
    "required": ["name", "mountPath"],
    "properties": {"name": STRING, "mountPath": STRING, "readOnly": BOOLEAN, "subPath": STRING},
}

CONTAINER: Schema = {
    "type": "object",
    "required": ["name", "image"],
    "properties": {
        "name": STRING,
        "image": STRING,
        "env": {"type": "array", "items": _NAMED},
        "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"],
                                             "properties": {"containerPort": INT32, "name": STRING}}},
        "resources": {"type": "object", "properties": {"requests": OBJECT, "limits": OBJECT}},
        "volumeMounts": {"type": "array", "items": VOLUME_MOUNT},
    },
}

POD_TEMPLATE: Schema = {  # corev1.PodTemplateSpec
    "type": "object",
    "required": ["spec"],
    "properties": {
        "metadata": OBJECT,
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {"type": "array", "minItems": 1, "items": CONTAINER},
                "initContainers": {"type": "array", "items": CONTAINER},
                "volumes": {"type": "array", "items": _NAMED},
            },
        },
    },
}

OBJECT_META: Schema = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": STRING, "namespace": STRING, "labels": STRING_MAP, "annotations": STRING_MAP},
}


# ----------------------------------------------------------------------------------------------
# raycluster_types.go

AUTH_OPTIONS = closed({
    "mode": enum(AUTH_MODES),  # +kubebuilder:validation:Enum=disabled;token (defaults to token)
    "secretName": STRING,
    "enableK8sTokenAuth": BOOLEAN,
})

HEAD_GROUP_SPEC = closed({
    "template": POD_TEMPLATE,
    "headService": OBJECT,
    "enableIngress": BOOLEAN,
    "resources": STRING_MAP,
    "labels": STRING_MAP,
    "rayStartParams": STRING_MAP,  # values are strings: num-cpus: "0", not 0
    "serviceType": STRING,
}, required=("template",))

WORKER_GROUP_SPEC = closed({
    "suspend": BOOLEAN,
    "groupName": STRING,
    "replicas": INT32,
    "minReplicas": INT32,  # defaults 0 (server-side, so not required here)
    "maxReplicas": INT32,  # defaults 2147483647
    "idleTimeoutSeconds": INT32,
    "resources": STRING_MAP,
    "labels": STRING_MAP,
    "rayStartParams": STRING_MAP,
    "template": POD_TEMPLATE,
    "scaleStrategy": closed({"workersToDelete": {"type": "array", "items": STRING}}),
    "numOfHosts": INT32,
}, required=("groupName", "template"))

RAY_CLUSTER_SPEC = closed({
    "upgradeStrategy": closed({"type": enum(("Recreate", "None"))}),
    "authOptions": AUTH_OPTIONS,
    "suspend": BOOLEAN,
    "managedBy": enum(MANAGED_BY),
    "autoscalerOptions": OBJECT,
    "headServiceAnnotations": STRING_MAP,
    "enableInTreeAutoscaling": BOOLEAN,
    "gcsFaultToleranceOptions": OBJECT,
    "headGroupSpec": HEAD_GROUP_SPEC,
    "rayVersion": STRING,
    "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP_SPEC},
}, required=("headGroupSpec",))


# ----------------------------------------------------------------------------------------------
# rayjob_types.go

_DELETION_RULE = closed({
    "policy": enum(DELETION_POLICIES),
    "condition": closed({
        "jobStatus": enum(("SUCCEEDED", "FAILED")),
        "jobDeploymentStatus": enum(("Failed",)),
        "ttlSeconds": NON_NEGATIVE_INT32,
    }),
}, required=("policy", "condition"))

DELETION_STRATEGY = closed({
    "onSuccess": closed({"policy": enum(DELETION_POLICIES)}),  # legacy, deprecated for deletionRules
    "onFailure": closed({"policy": enum(DELETION_POLICIES)}),
    "deletionRules": {"type": "array", "minItems": 1, "items": _DELETION_RULE},
})

RAY_JOB_SPEC = closed({
    "activeDeadlineSeconds": INT32,
    "backoffLimit": INT32,
    "rayClusterSpec": RAY_CLUSTER_SPEC,
    "submitterPodTemplate": POD_TEMPLATE,
    "metadata": STRING_MAP,
    "clusterSelector": STRING_MAP,
    "submitterConfig": closed({"backoffLimit": INT32}),
    "managedBy": enum(MANAGED_BY),
    "deletionStrategy": DELETION_STRATEGY,
    "entrypoint": STRING,
    "runtimeEnvYAML": STRING,  # a YAML document in a string, parsed by Ray, not by the API server
    "jobId": STRING,
    "submissionMode": enum(SUBMISSION_MODES),
    "entrypointResources": STRING,  # a JSON object in a string
    "entrypointNumCpus": NUMBER,
    "entrypointNumGpus": NUMBER,
    "ttlSecondsAfterFinished": INT32,
    "shutdownAfterJobFinishes": BOOLEAN,
    "suspend": BOOLEAN,
})


# ----------------------------------------------------------------------------------------------
# rayservice_types.go

RAY_SERVICE_SPEC = closed({
    "rayClusterDeletionDelaySeconds": NON_NEGATIVE_INT32,
    "serviceUnhealthySecondThreshold": INT32,  # deprecated, ignored by the operator
    "deploymentUnhealthySecondThreshold": INT32,  # deprecated, ignored by the operator
    "serveService": OBJECT,
    "upgradeStrategy": closed({
        "type": enum(UPGRADE_TYPES),
        "clusterUpgradeOptions": closed({  # NewClusterWithIncrementalUpgrade only
            "maxSurgePercent": INT32,
            "stepSizePercent": INT32,
            "intervalSeconds": INT32,
            "gatewayClassName": STRING,
        }, required=("stepSizePercent", "intervalSeconds", "gatewayClassName")),
    }),
    "serveConfigV2": STRING,  # a Serve config YAML in a string: checked against Ray Serve's own schema
    "rayClusterConfig": RAY_CLUSTER_SPEC,
    "excludeHeadPodFromServeSvc": BOOLEAN,
}, required=("rayClusterConfig",))


# ----------------------------------------------------------------------------------------------
# the resources


def resource(kind: str, spec: Schema) -> Schema:
    """A ``ray.io/v1`` object of ``kind`` whose ``spec`` follows ``spec``."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"{kind} (ray.io/v1, KubeRay {KUBERAY_VERSION}, fields sidforge uses)",
        **closed({
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": kind},
            "metadata": OBJECT_META,
            "spec": spec,
        }, required=("apiVersion", "kind", "metadata", "spec")),
    }


SCHEMAS: dict[str, Schema] = {
    "RayJob": resource("RayJob", RAY_JOB_SPEC),
    "RayService": resource("RayService", RAY_SERVICE_SPEC),
}
