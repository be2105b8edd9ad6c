/* The C template exports only lora_agg_plugin_entry, declared in lora_agg.h. */
#include "lora_agg.h"
