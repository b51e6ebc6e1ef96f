import { homedir } from 'node:os';
import { join } from 'node:path';

function env(name: string): string | undefined {
  const value = process.env[name];
  return value && value.length > 0 ? value : undefined;
}

/** Rebuildable artefacts (the default image, kernels): `MVM_CACHE_DIR`, else `$XDG_CACHE_HOME/mvm`, else `~/.cache/mvm`. */
export function cacheDir(): string {
  return env('MVM_CACHE_DIR') ?? join(env('XDG_CACHE_HOME') ?? join(homedir(), '.cache'), 'mvm');
}

/** Things the user made and wants kept (templates): `MVM_DATA_DIR`, else `$XDG_DATA_HOME/mvm`, else `~/.local/share/mvm`. */
export function dataDir(): string {
  return env('MVM_DATA_DIR') ?? join(env('XDG_DATA_HOME') ?? join(homedir(), '.local', 'share'), 'mvm');
}

/**
 * Per-VM runtime state (pids, sockets, staging images): `MVM_STATE_DIR`, else `$XDG_RUNTIME_DIR/mvm`,
 * else `~/.local/state/mvm`. Unix socket paths must stay short (108 bytes), so keep this shallow.
 */
export function stateDir(): string {
  return env('MVM_STATE_DIR') ?? join(env('XDG_RUNTIME_DIR') ?? join(homedir(), '.local', 'state'), 'mvm');
}

/** `~` or a leading `~/` as the user's home directory, as a shell would expand it; other paths unchanged. */
export function expandHome(path: string): string {
  return path === '~' || path.startsWith('~/') ? homedir() + path.slice(1) : path;
}
