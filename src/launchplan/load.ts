import { MvmError } from '../errors.js';
import { mergeEnv } from './env.js';
import { formatJsonPath, readPlanFile } from './read.js';
import { UNNAMED_APP, type Entrypoint } from './schema.js';

/** What `mvmctl exec --launch-plan` runs: the consumed part of either file shape. */
export interface LaunchPlan {
  source: 'artifact' | 'workload-ir';
  /** `workload_id` of an artifact, the app's `name` in a Workload IR manifest (`app` when it has none). */
  workloadId: string;
  argv: string[];
  /**
   * Absolute; `/` when the plan gives no working_dir. Exec creates it (and its parents) in the guest
   * when missing, so a plan runs on an image that lacks the directory, as a container WORKDIR would.
   */
  cwd: string;
  /** `env` of the artifact or app, overridden by `entrypoint.env`. CLI `--env` goes on top via `mergeEnv`. */
  env: Record<string, string>;
  /** JSON paths of fields this version ignores, e.g. `apps[0].resources`, for `-v` to list. */
  ignoredFields: string[];
}

/**
 * Reads and validates a launch.json artifact or a single-app Workload IR manifest. Every failure is an
 * MvmError (exit 125) with one line naming the file and, for invalid content, the JSON path.
 */
export async function loadLaunchPlan(path: string): Promise<LaunchPlan> {
  const label = `launch plan ${path}`;
  const file = await readPlanFile(path, label);
  if (file.shape === 'artifact') {
    const { artifact } = file;
    return toPlan('artifact', artifact.workload_id, artifact.entrypoint, artifact.env, file.ignoredFields);
  }
  const { apps } = file.manifest;
  if (apps.length > 1) {
    const names = apps
      .map((app, i) => (app.name === undefined ? formatJsonPath(['apps', i]) : /^[\w.-]+$/.test(app.name) ? app.name : JSON.stringify(app.name)))
      .join(', ');
    throw new MvmError(
      `${label} has ${apps.length} apps (${names}): exec runs one workload; orchestrating several belongs to a ` +
        `long-running host such as mvmd (to run one, \`mvmctl compile ${path} --out DIR\` and pass DIR/<app>/launch.json)`,
    );
  }
  const [app] = apps;
  return toPlan('workload-ir', app!.name ?? UNNAMED_APP, app!.entrypoint, app!.env, file.ignoredFields);
}

function toPlan(
  source: LaunchPlan['source'],
  workloadId: string,
  entrypoint: Entrypoint,
  env: Record<string, string> | undefined,
  ignoredFields: string[],
): LaunchPlan {
  return {
    source,
    workloadId,
    argv: entrypoint.command,
    cwd: entrypoint.working_dir ?? '/',
    env: mergeEnv(env ?? {}, entrypoint.env ?? {}),
    ignoredFields,
  };
}
