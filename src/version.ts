/** Coffer's version, from package.json (one source of truth). */
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';

function findPackageJson(): string {
  // src/version.ts under Jest, dist/src/version.js when built.
  for (const up of ['..', '../..']) {
    const p = join(__dirname, up, 'package.json');
    if (existsSync(p)) return p;
  }
  throw new Error('package.json not found');
}

/**
 * `COFFER_ADVERTISE_VERSION` makes a process claim another version — for rehearsing an upgrade
 * order (a secondary refuses a newer primary) without building two releases.
 */
export const VERSION: string = process.env.COFFER_ADVERTISE_VERSION || JSON.parse(readFileSync(findPackageJson(), 'utf8')).version;
