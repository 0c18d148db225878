/* SPDX-License-Identifier: MIT */
/*++
 * NAME
 *	standalone 1
 * SUMMARY
 *	replay fuzz inputs without libFuzzer
 * SYNOPSIS
 *	fuzz_<target> file-or-directory...
 * DESCRIPTION
 *	Linked with one fuzz target instead of -fsanitize=fuzzer, so that
 *	any C compiler (gcc in CI's test suite) can replay the seed corpus
 *	and every saved crash input under ASan and UBSan. Each file is one
 *	input, a directory means every regular file in it, in name order.
 *	Prints "RUN name" before each input and a final "replayed N
 *	inputs" line; a broken invariant aborts (FUZZ_CHECK), so the last
 *	RUN line names the input that broke it.
 * DIAGNOSTICS
 *	Exit status 0 when every input ran, 2 for a file that cannot be
 *	read; sanitizers and FUZZ_CHECK abort with their own status.
 *--*/

#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int     LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int     LLVMFuzzerInitialize(int *argc, char ***argv) __attribute__((weak));

static int run_file(const char *path);
static int cmp_names(const void *a, const void *b);

static int passed;

/* run_file - one input */

static int run_file(const char *path)
{
    FILE   *f;
    uint8_t *buf = NULL;
    size_t  len = 0, cap = 0, n;

    if ((f = fopen(path, "rb")) == NULL) {
	perror(path);
	return 2;
    }
    for (;;) {
	if (cap - len < 65536) {
	    cap = cap ? cap * 2 : 65536;
	    if ((buf = realloc(buf, cap)) == NULL)
		abort();
	}
	if ((n = fread(buf + len, 1, cap - len, f)) == 0)
	    break;
	len += n;
    }
    fclose(f);
    printf("RUN %s (%zu bytes)\n", path, len);
    fflush(stdout);
    /* An exact-size copy, so that ASan sees any read past the end. */
    {
	uint8_t *exact = malloc(len ? len : 1);

	if (exact == NULL)
	    abort();
	memcpy(exact, buf, len);
	LLVMFuzzerTestOneInput(exact, len);
	free(exact);
    }
    free(buf);
    passed++;
    return 0;
}

/* cmp_names - qsort order for directory entries */

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *) a, *(char *const *) b);
}

int     main(int argc, char **argv)
{
    struct stat st;
    struct dirent *d;
    DIR    *dir;
    char  **names, *path;
    size_t  n, cap, i;
    int     arg, rc = 0;

    if (LLVMFuzzerInitialize)
	LLVMFuzzerInitialize(&argc, &argv);
    for (arg = 1; arg < argc && rc == 0; arg++) {
	if (stat(argv[arg], &st) != 0) {
	    perror(argv[arg]);
	    rc = 2;
	    break;
	}
	if (!S_ISDIR(st.st_mode)) {
	    rc = run_file(argv[arg]);
	    continue;
	}
	if ((dir = opendir(argv[arg])) == NULL) {
	    perror(argv[arg]);
	    rc = 2;
	    break;
	}
	names = NULL;
	n = cap = 0;
	while ((d = readdir(dir)) != NULL) {
	    if (d->d_name[0] == '.')
		continue;
	    if (n == cap && (names = realloc(names, (cap = cap ? cap * 2 : 64)
					     * sizeof(*names))) == NULL)
		abort();
	    if ((names[n++] = strdup(d->d_name)) == NULL)
		abort();
	}
	closedir(dir);
	if (n > 0)
	    qsort(names, n, sizeof(*names), cmp_names);
	for (i = 0; i < n; i++) {
	    if ((path = malloc(strlen(argv[arg]) + strlen(names[i]) + 2)) == NULL)
		abort();
	    sprintf(path, "%s/%s", argv[arg], names[i]);
	    if (rc == 0 && stat(path, &st) == 0 && S_ISREG(st.st_mode))
		rc = run_file(path);
	    free(path);
	    free(names[i]);
	}
	free(names);
    }
    printf("replayed %d input%s%s\n", passed, passed == 1 ? "" : "s",
	   rc ? ", then stopped at an unreadable one" : "");
    return rc;
}
