/* Temporary: the io_uring proactor lands here shortly. */
#include "loop_internal.h"

int ca_proactor_loop_new(ca_loop **out)
{
    if (!out) return -EINVAL;
    return -ENOSYS;
}
