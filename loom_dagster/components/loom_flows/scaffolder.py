"""``dg scaffold defs loom_dagster.LoomFlowsComponent <name>``: a commented defs.yaml skeleton.

Optional parameters (``--json-params '{"import_path": ..., "config": ...}'`` or ``--import-path`` /
``--config`` / ``--environment``) fill in the first flow; without them it names a placeholder flow, so
the file passes ``dg check yaml`` and tells what to edit before ``dg list defs`` can load it.
"""

from __future__ import annotations

import json

from dagster.components.component_scaffolding import scaffold_component
from dagster.components.scaffold.scaffold import Scaffolder, ScaffoldRequest
from pydantic import BaseModel, Field

__all__ = ["LoomFlowsScaffoldParams", "LoomFlowsScaffolder", "defs_yaml_skeleton"]

PLACEHOLDER_IMPORT_PATH = "my_package.flows:my_flow"
PLACEHOLDER_CONFIG = "config"


class LoomFlowsScaffoldParams(BaseModel):
    """What ``dg scaffold defs`` may fill in for the first flow."""

    import_path: str | None = Field(default=None, description="'package.module:attribute' of the StreamFlow.")
    config: str | None = Field(
        default=None, description="loom config file or directory, relative to the new defs.yaml."
    )
    environment: str | None = Field(default=None, description="loom environment (default: $LOOM_ENV).")


def defs_yaml_skeleton(type_name: str, params: LoomFlowsScaffoldParams) -> str:
    """The defs.yaml text: one flow (from *params*, else placeholders) and the optional keys commented."""
    import_path = params.import_path or PLACEHOLDER_IMPORT_PATH
    config = params.config or PLACEHOLDER_CONFIG
    environment = params.environment or "{{ env('LOOM_ENV', 'production') }}"
    hint = "" if params.import_path else "   # replace with your StreamFlow's module:attribute"
    return f"""\
type: {type_name}

attributes:
  # key_prefix: [streaming]        # prefix of every loom asset key
  flows:
    - import_path: {json.dumps(import_path)}{hint}
      config: {json.dumps(config)}          # relative to this defs.yaml
      environment: {json.dumps(environment)}
      # group_name: streaming
      # owners: ["team:data-platform"]
      # processes: 1
  # translation:                   # per loom asset: kind, name, spec, flow, topic, collection, sink
  #   tags: {{loom/kind: "{{{{ kind }}}}"}}
  # redeploy_cron: "0 3 * * *"
  # sensors:
  #   kafka_lag: {{warn_lag: 5000}}
  #   sink_health: {{default_freshness: {{warn_after_s: 900, fail_after_s: 3600}}}}
  # deploy:
  #   mode: validate               # CI: compile and check, launch nothing
"""


class LoomFlowsScaffolder(Scaffolder[LoomFlowsScaffoldParams]):
    """Writes ``defs.yaml`` (YAML format) or Dagster's default ``component.py`` (Python format)."""

    @classmethod
    def get_scaffold_params(cls) -> type[LoomFlowsScaffoldParams]:
        return LoomFlowsScaffoldParams

    def scaffold(self, request: ScaffoldRequest[LoomFlowsScaffoldParams]) -> None:
        if request.scaffold_format != "yaml" or request.append:
            scaffold_component(request, {"flows": []} if request.append else None)
            return
        params = request.params or LoomFlowsScaffoldParams()
        (request.target_path / "defs.yaml").write_text(defs_yaml_skeleton(request.type_name, params))
