/* Linked against libcrosvm_plugin by tests/c_header.rs: connecting without
 * (or with an invalid) CROSVM_SOCKET fails cleanly. */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

#include "crosvm.h"

#define EXPECT(expr, want)                                              \
  do {                                                                  \
    int got_ = (expr);                                                  \
    if (got_ != (want)) {                                               \
      fprintf(stderr, "%s: got %d, want %d\n", #expr, got_, (want));    \
      return 1;                                                         \
    }                                                                   \
  } while (0)

int main(void) {
  struct crosvm *crosvm = NULL;
  uint64_t args[4] = {0, 0, 0, 0};

  unsetenv("CROSVM_SOCKET");
  EXPECT(crosvm_connect(&crosvm), -ENOTCONN);
  if (crosvm != NULL) {
    fprintf(stderr, "out-parameter written on failure\n");
    return 1;
  }
  setenv("CROSVM_SOCKET", "not-a-number", 1);
  EXPECT(crosvm_connect(&crosvm), -EINVAL);
  setenv("CROSVM_SOCKET", "-3", 1);
  EXPECT(crosvm_connect(&crosvm), -EINVAL);
  /* VM-level capabilities never reach the VMM. */
  EXPECT(crosvm_enable_capability(NULL, KVM_CAP_IRQCHIP, 0, args), -EINVAL);
  printf("c connect test: ok\n");
  return 0;
}
