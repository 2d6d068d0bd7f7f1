/** Maximum length of a model, provider or pool id, in UTF-8 bytes. */
export const maxIdBytes = 512;

/** Most model ids one pool may list in its active and standby lists together. */
export const maxPoolMembers = 100_000;
